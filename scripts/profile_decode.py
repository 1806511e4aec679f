"""One tc (or --kernel warp) decode call at a chosen size, for Nsight Compute (ncu) to profile (no timing here).

    ncu --kernel-name regex:_decode_tc_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python3 scripts/profile_decode.py --context 32768 --batch 8 [--set unpack_asm=true ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_decode_attention import HQ, D, G, make_storage  # noqa: E402

from kvarn.attention.triton import decode_tc, decode_warp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90_report import parse_value  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--kernel", choices=["tc", "warp"], default="tc")
    a = ap.parse_args()
    launch = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    st = make_storage(a.batch, a.context // G - 1, torch.device("cuda"))
    q = torch.randn(a.batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    module = decode_warp if a.kernel == "warp" else decode_tc
    for _ in range(a.calls):
        module.quantized_decode_attention(q, **st, **launch)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
