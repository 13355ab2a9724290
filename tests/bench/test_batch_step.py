"""`python -m bench.batch_step`: the compiled greedy step by batch size, with each attention form."""

from app.model import model as model_module
from bench.batch_step import FORMS, bench_batch_step


def test_both_attention_forms_time_each_batch_and_width_and_emit_the_same_tokens(
    byte_checkpoint: tuple[str, str],
) -> None:
    ckpt, _ = byte_checkpoint
    out = bench_batch_step(ckpt, batches=[2], positions=[40], rounds=2, autotune=False, calls=3)
    assert out["same_tokens"] is True
    assert set(out["compile_s"]) == set(FORMS)
    steps = out["steps"]["position 40"]
    assert list(steps) == ["width 1", "width 4"]  # a plain step and one verifying k - 1 = 3 drafts
    for width in steps.values():
        assert list(width) == ["batch 2"]
        for cell in width.values():
            assert cell["explicit_ms"] > 0 and cell["sdpa_ms"] > 0
            assert cell["explicit_ms_per_row"] <= cell["explicit_ms"]
    assert model_module.COMPILED_CPU_ATTENTION == "explicit"  # put back after compiling the other form
