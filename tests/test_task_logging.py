"""Logging in submitted tasks is set up as in the CLI: an 8-bit task's log holds bitsandbytes'
per-matmul warning once, not once per 8-bit matrix multiplication, and no library
deprecation notices. The task runs for real through submitit's local executor (a fresh
process that unpickles the task, as on SLURM)."""

from __future__ import annotations

import logging
import uuid

from fada_batch.run.launch import log_dir, submit


def test_an_8bit_task_log_holds_a_handful_of_warnings_not_one_per_matmul(job_factory):
    cfg = job_factory(
        {
            "model.quantization": "8bit",
            "data.num_images": 6,
            "data.categories": ["Femur"],
            "train.num_epochs": 1,
            "train.batch_size": 4,
            "eval.after_training": True,  # generation: thousands of 8-bit matmuls more
        }
    )
    record = submit(cfg, executor="local")
    assert record["results"] == {"Femur": "completed"}
    logs = sorted(log_dir(cfg).glob("*_log.*"))
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    lines = text.splitlines()
    matmul = [x for x in lines if "MatMul8bitLt" in x]
    warnings = [x for x in lines if "WARNING" in x or "Warning:" in x]
    deprecated = [x for x in lines if "deprecat" in x.lower()]
    print(f"{len(lines)} log lines, {len(warnings)} warnings, {len(matmul)} MatMul8bitLt")
    assert len(matmul) == 1, matmul[:5]  # once, with a timestamp and the logger's name
    assert "WARNING bitsandbytes" in matmul[0]
    assert len(warnings) <= 5, warnings
    assert deprecated == []
    assert "Femur: epoch 1/1 done" in text  # the task's own progress is there


def test_setup_logging_lets_a_repeated_library_warning_through_once(caplog):
    from fada_batch.logsetup import OncePerMessage, setup_logging

    # pytest keeps one capture handler for the whole session: an earlier test that ran the CLI
    # left a filter on it that has seen bitsandbytes' message already (e.g. test_precision's
    # 8-bit training); start from a handler without one, as a fresh process does
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, OncePerMessage)]:
            handler.removeFilter(f)
    setup_logging()  # filters the handlers of the root logger, pytest's capture among them
    # The filter on pytest's handler lives for the whole session and may have passed the real
    # MatMul8bitLt message in an earlier test: this test's messages are its own.
    tag = uuid.uuid4().hex
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    for dtype in ("torch.float32", "torch.bfloat16") * 25:
        bnb.warning(
            f"MatMul8bitLt ({tag}): inputs will be cast from %s to float16 during quantization", dtype
        )
    bnb.warning(f"another message {tag}")
    logging.getLogger("transformers.modeling_utils").warning("library noise")
    for _ in range(3):
        logging.getLogger("fada_batch.training.recipe").warning("ours: every one is shown")
    texts = [r.getMessage() for r in caplog.records]
    assert sum(f"MatMul8bitLt ({tag})" in t for t in texts) == 1
    assert f"another message {tag}" in texts and "library noise" not in texts
    assert texts.count("ours: every one is shown") == 3
