"""The evaluation's simulated cache gives the model what the real compact ``KVarNCache`` gives it.

Teacher-forced in tile-sized chunks, the logits of the model over ``SimulatedQuantizedCache``
(dense reconstructions, sdpa) and over ``KVarNCache`` (packed codes, the "kvarn" attention) agree
to float rounding for every tile method: the suites' numbers are those of the compact cache.
"""

from __future__ import annotations

import pytest
import torch

from kvarn.config import KVarNConfig
from kvarn.eval.common import chunk_bounds, forward_chunk, load_model_for_eval
from kvarn.eval.simulated_cache import SimulatedQuantizedCache
from tests.test_eval_support import tiny_model_dir  # noqa: F401  (fixture)

kvarn = pytest.importorskip("kvarn")
if not hasattr(kvarn, "KVarNCache"):  # pragma: no cover - only before the cache landed
    pytest.skip("kvarn.KVarNCache is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):  # noqa: F811
    return load_model_for_eval(str(tiny_model_dir)).model


def teacher_forced(model, ids: torch.Tensor, cache, attention: str) -> torch.Tensor:
    model.set_attn_implementation(attention)
    try:
        return torch.cat(
            [forward_chunk(model, ids[:, s:e], cache) for s, e in chunk_bounds(0, ids.shape[1], 32)]
        )
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("spec", ["kvarn:k4v2", "kivi:k2v2", "hadamard_rtn:k2v2", "varn_norot:k4v4"])
@pytest.mark.parametrize("keep_sink", [True, False])
def test_simulated_cache_matches_the_compact_cache(model, spec, keep_sink):
    config = KVarNConfig.parse(spec, tile_size=32, keep_sink_tile=keep_sink)
    ids = torch.randint(1, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    simulated = teacher_forced(model, ids, SimulatedQuantizedCache(config), "sdpa")
    compact = teacher_forced(model, ids, kvarn.KVarNCache(config=model.config, quant=config), "kvarn")
    exact = teacher_forced(model, ids, None, "sdpa")
    quantization_effect = (simulated - exact).abs().max()
    assert quantization_effect > 0.05  # the comparison below is not vacuous
    # Float rounding only: the compact cache works in the rotated frame on packed codes, so an
    # element on a rounding boundary can take the neighbouring code; that stays far below the
    # quantization effect itself.
    assert (simulated - compact).abs().max() <= 0.01 * quantization_effect
    assert (simulated - compact).abs().mean() <= 1e-4
