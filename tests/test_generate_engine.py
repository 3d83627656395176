"""`generate --input` runs through the serving engine (telechat_ms.serve.offline): the output file is what the
static-cache batch path writes (greedy: the same answers, records, order, error lines), chunked prefill and batch
mates change no token, and requests are read lazily, a bounded window ahead of the output."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("mindspore")

from telechat_ms.cli import main  # noqa: E402
from tests import serve_fixtures as fx  # noqa: E402
from tests.serve_fixtures import random_ids  # noqa: E402

serve_model_dir, tokenizer, ref_model = fx.serve_model_dir, fx.tokenizer, fx.ref_model   # module fixtures


def _lines(tokenizer) -> list[str]:
    vocab = tokenizer.vocab_size
    text = [tokenizer.decode(random_ids(n, 100 + n, vocab)) for n in (3, 60, 9, 130, 20)]
    records = [{"id": "a", "prompt": text[0]}, {"id": "b", "messages": [{"role": "user", "content": text[1]}]},
               "not json", {"id": "c", "system": "be brief", "dialog": [{"role": "user", "content": text[2]},
                                                                       {"role": "bot", "content": "ref"}]},
               {"id": "d", "prompt": text[3]}, {"prompt": text[4]}, {"id": "e", "prompt": "你好"}]
    return [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]


def test_generate_input_through_the_engine_writes_the_static_paths_file(serve_model_dir, tokenizer, ref_model,
                                                                         tmp_path, capsys):
    from telechat_ms.infer.batch import predict_file
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(_lines(tokenizer)) + "\n", encoding="utf-8")
    want = tmp_path / "static.jsonl"
    predict_file(ref_model, tokenizer, str(src), str(want), show_progress=False, batch_size=1, max_new_tokens=10)
    got = tmp_path / "engine.jsonl"
    # 4 rows, chunks of at most 32 tokens (the 130-token prompt in 5 steps while others decode), 8-token blocks
    assert main(["generate", serve_model_dir, "--input", str(src), "--output", str(got), "--max-new-tokens", "10",
                 "--quiet", "--batch-size", "4", "--max-num-batched-tokens", "32", "--block-size", "8"]) == 0
    assert "wrote 6 answers" in capsys.readouterr().err
    want_text, got_text = want.read_text(encoding="utf-8"), got.read_text(encoding="utf-8")
    assert got_text == want_text
    records = [json.loads(x) for x in got_text.splitlines()]
    assert [r["id"] for r in records] == ["a", "b", 3, "c", "d", 6, "e"] and "error" in records[2]
    assert records[3]["reference"] == "ref" and records[4]["prompt_tokens"] > 130
    assert sum(r.get("new_tokens", 0) for r in records) > 30


def test_requests_are_read_a_bounded_window_ahead(serve_model_dir, tokenizer, ref_model):
    """A long input is never held whole: when answer k is written at most window + k + 1 lines were read; greedy
    answers equal one-sequence generate."""
    from telechat_ms.infer.batch import Request
    from telechat_ms.infer.gen_config import GenerationConfig
    from telechat_ms.serve.offline import offline_engine, run_engine_batch
    from telechat_ms.serve.server import ServeConfig
    vocab = tokenizer.vocab_size
    prompts = [tokenizer.decode(random_ids(5 + i % 7, 300 + i, vocab)) for i in range(24)]
    read = [0]

    def source():
        for i, p in enumerate(prompts):
            read[0] += 1
            yield Request(f"x:{i + 1}", i + 1, i, p)

    engine = offline_engine(ref_model, tokenizer, ServeConfig(model_dir="", max_batch_size=2, block_size=8),
                            64, max_queue=4)
    written, ahead = [], []

    def write(rec):
        written.append(rec)
        ahead.append(read[0] - len(written))
    config = GenerationConfig(max_new_tokens=4, eos_token_id=None)
    counts = run_engine_batch(engine, tokenizer, source(), write, config)
    assert counts == {"answered": 24, "errors": 0, "new_tokens": 96}
    assert max(ahead) <= 4 and [r["id"] for r in written] == list(range(24))
    for rec, p in zip(written[:3], prompts):
        ids = tokenizer.encode(p)
        new = ref_model.generate([ids], max_new_tokens=4, eos_token_id=None).new_tokens[0]
        assert rec["answer"] == tokenizer.decode(new, skip_special_tokens=True)
    assert all(r == 0 for r in engine.blocks.ref)
