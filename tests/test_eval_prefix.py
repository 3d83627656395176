"""A shared few-shot prefix computed once (eval/prefix.py): the scores equal the torch reference's summed log-probs
of the whole prompt (1e-4), with one-token and multi-token continuations, prompts past training_seqlen (rows of
other NTK tables never share keys), and the prefix is really computed once per group."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from telechat_ms.eval.prefix import LocalPrefixForward  # noqa: E402
from telechat_ms.eval.scoring import LoglikelihoodScorer, _Row, group_prefixes, local_forward  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.reference.torch_model import TeleChatRef  # noqa: E402

MAX_LEN = 96            # training_seqlen 32: most rows here are past it


def _requests(vocab: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(11)
    out = []
    for shots in (20, 40):                      # two subjects, each with its few-shot exemplars
        fewshot = rng.integers(9, vocab, size=shots).tolist()
        for _ in range(5):
            ctx = fewshot + rng.integers(9, vocab, size=int(rng.integers(2, 20))).tolist()
            out += [(ctx, [int(t)]) for t in rng.integers(9, vocab, size=4)]
            out.append((ctx, rng.integers(9, vocab, size=3).tolist()))
    out.append((rng.integers(9, vocab, size=30).tolist(), [12]))        # shares nothing
    return out


def test_shared_prefix_scores_equal_the_torch_reference(ckpt_factory):
    path = ckpt_factory("eval_prefix", qk_scale=4.0, seed=5)
    model = TeleChatForCausalLM.from_pretrained(path)
    ref = TeleChatRef.from_pretrained(path)
    reqs = _requests(model.config.vocab_size)
    prefix = LocalPrefixForward(model)
    scorer = LoglikelihoodScorer(local_forward(model), MAX_LEN - 1, 3, prefix=prefix, min_prefix=8)
    got = scorer.score(reqs)
    plain = LoglikelihoodScorer(local_forward(model), MAX_LEN - 1, 3).score(reqs)
    want, greedy = [], []
    with torch.no_grad():
        for ctx, cont in reqs:
            whole = ctx + cont
            lp = torch.log_softmax(ref(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            rows = lp[len(ctx) - 1:len(whole) - 1]
            want.append(sum(rows[j, t].item() for j, t in enumerate(cont)))
            greedy.append(all(int(rows[j].argmax()) == t for j, t in enumerate(cont)))
    np.testing.assert_allclose([g[0] for g in got], want, atol=1e-4, rtol=0)
    assert [g[1] for g in got] == [p[1] for p in plain]
    assert np.ptp(want) > 0.5
    # groups split where the NTK tables differ (every length past 32 has its own), each group's prefix once
    assert 0 < prefix.prefix_tokens < sum(len(c) for c, _ in reqs) // 4


def test_groups_keep_the_exemplars_and_respect_the_tables_key():
    shots = list(range(100, 140))
    rows = [_Row(shots + [1, q]) for q in range(4)] + [_Row(shots[:10] + [7, 7, 7])] + [_Row([5] * 12)]
    for r in rows:
        r.gather = {len(r.ids) - 1: [9]}
    groups, rest = group_prefixes(rows, lambda n: 0, 8)
    assert [(p, len(m)) for p, m in groups] == [(41, 4)]          # the outlier does not cut the 40 shared tokens
    assert sorted(len(r.ids) for r in rest) == [12, 13]
    longer = [_Row(shots + [1] * q) for q in range(1, 5)]
    for r in longer:
        r.gather = {len(r.ids) - 1: [9]}
    assert group_prefixes(longer, lambda n: 0, 8)[0] == [(40, longer)]
    assert group_prefixes(longer, lambda n: n, 8) == ([], longer)     # other tables (lengths): nothing shared


def test_eval_with_fewshot_shares_the_exemplars_and_equals_the_reference(tmp_path):
    """`eval` with --num-fewshot 2: the questions of a subject repeat its exemplars, computed once; every logged
    log-likelihood equals the torch reference's (training_seqlen 512: the prompts share their tables)."""
    import json
    from pathlib import Path

    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.data.train_tokenizer import train_tokenizer
    from telechat_ms.eval.model import load_eval_model
    from telechat_ms.eval.runner import EvalOptions, run_eval
    from telechat_ms.eval.scoring import encode_pair
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    tok = train_tokenizer(str(tmp_path / "tok"), vocab_size=1024)
    out = str(tmp_path / "model")
    write_random_hf_checkpoint(out, tiny_config(vocab_size=tok.vocab_size, seq_length=512, training_seqlen=512,
                                                base_seqlen=512), qk_scale=4.0, seed=4)
    tok.save_pretrained(out)
    em = load_eval_model(out, batch_size=2)
    data = Path(__file__).parent / "eval_data"
    run_eval(em, EvalOptions(tasks=["ceval", "mmlu"], data_dir=str(data), output=str(tmp_path / "o"), num_fewshot=2,
                             log_samples=True, progress=False), batch_size=2)
    assert em.scorer.prefix.prefix_tokens > 0
    ref, tok = TeleChatRef.from_pretrained(out), TeleChatTokenizer.from_pretrained(out)
    worst = 0.0
    for task in ("ceval", "mmlu"):
        for line in (tmp_path / "o" / f"samples_{task}.jsonl").read_text().splitlines():
            r = json.loads(line)
            for choice, got in zip(r["choices"], r["loglikelihoods"]):
                ctx, cont = encode_pair(tok.encode, r["prompt"], choice)
                whole = (ctx + cont)[-513:]
                with torch.no_grad():
                    lp = torch.log_softmax(ref(torch.tensor([whole[:-1]])).logits[0].double(), -1)
                want = sum(lp[len(whole) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))
                worst = max(worst, abs(want - got))
            assert r["pred"] == int(np.argmax(r["loglikelihoods"]))
    assert worst < 1e-4, worst
