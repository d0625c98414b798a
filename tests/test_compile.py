"""``train.compile`` on packed rows: the blocks are compiled shape-generic once, whatever row counts follow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.mark.slow  # dynamo traces the blocks (about 10 s of a core)
def test_dynamic_blocks_do_not_tie_the_row_count_to_an_equal_size(tiny_model: Path) -> None:
    """The tiny Bloom has 4 heads; a first batch of 4 rows must not compile graphs that guard rows == heads (duck
    sizing did: every later row count recompiled every block, mid-run, inside a timed benchmark window)."""
    import torch.fx.experimental._config as fx_config
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from ia3_dist.models.load import compile_blocks

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert model.config.n_head == 4
    torch._dynamo.reset()
    counters.clear()
    duck = fx_config.use_duck_shape
    try:
        compile_blocks(model, dynamic=True, backend="eager")
        graphs = []
        with torch.no_grad():
            for rows in (4, 3, 5):
                ids = torch.randint(0, model.config.vocab_size, (rows, 64))
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                graphs.append(counters["stats"]["unique_graphs"])
    finally:
        fx_config.use_duck_shape = duck
        torch._dynamo.reset()
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3, graphs


@pytest.mark.slow  # imports dynamo and inductor (about 4 s)
def test_cpu_inductor_compiles_avx2_code_unless_told_otherwise(tiny_model: Path) -> None:
    """torch 2.13's AVX-512 C++ code for the compiled blocks corrupted the heap on packed rows (the packed compile
    run in test_packing_train.py aborted 5 of 5 times on an AVX-512 box): CPU blocks compile with 256-bit vectors;
    a width the caller set stays; other backends are left alone. (Wrapping compiles nothing: no trace here.)"""
    import torch._inductor.config as inductor_config
    from transformers import AutoModelForCausalLM

    from ia3_dist.models.load import compile_blocks

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    before = inductor_config.cpp.simdlen
    try:
        inductor_config.cpp.simdlen = None
        compile_blocks(model, backend="aot_eager")
        assert inductor_config.cpp.simdlen is None
        compile_blocks(model, backend="inductor")
        assert inductor_config.cpp.simdlen == 256
        inductor_config.cpp.simdlen = 512
        compile_blocks(model, backend="inductor")
        assert inductor_config.cpp.simdlen == 512
    finally:
        inductor_config.cpp.simdlen = before
        torch._dynamo.reset()
