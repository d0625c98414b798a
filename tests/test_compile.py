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


@pytest.mark.slow  # imports dynamo and inductor, which compiles its ISA probes (about 6 s)
def test_cpu_inductor_avoids_avx512_code_unless_told_otherwise(tiny_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.13's AVX-512 C++ code for the compiled blocks corrupted the heap on packed rows (the packed compile
    run in test_packing_train.py aborted 5 of 5 times on an AVX-512 box): where inductor would write 512-bit code
    for CPU blocks, it writes 256-bit code; a width or an ATEN_CPU_CAPABILITY the user set stays, as do GPU runs
    and other backends. (Wrapping compiles nothing: no trace here.)"""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa
    from transformers import AutoModelForCausalLM

    from ia3_dist.models.load import compile_blocks

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inductor_config.cpp, "simdlen", None)
    # This box's ISA decides (the AVX-512 box of the note: 256); an AVX2-only or ARM CPU keeps inductor's pick.
    wide = cpu_vec_isa.pick_vec_isa().bit_width() == 512
    try:
        compile_blocks(model, backend="aot_eager")
        assert inductor_config.cpp.simdlen is None
        compile_blocks(model, backend="inductor")
        assert inductor_config.cpp.simdlen == (256 if wide else None)
        for told in ({"simdlen": 512}, {"env": "avx512"}, {"gpu": True}):
            inductor_config.cpp.simdlen = told.get("simdlen")
            if "env" in told:
                monkeypatch.setenv("ATEN_CPU_CAPABILITY", told["env"])
            monkeypatch.setattr(torch.cuda, "is_available", lambda told=told: told.get("gpu", False))
            compile_blocks(model, backend="inductor")
            assert inductor_config.cpp.simdlen == told.get("simdlen"), told
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    finally:
        torch._dynamo.reset()
