"""Demo-tokenizer training time (make demo and the test fixtures train one): telechat_ms's train_tokenizer (read +
render the demo data, train, check the special ids, save) vs SentencePiece's trainer alone on the same sentences,
in one run. Prints seconds and the ratio (the overhead of everything around the trainer).

Usage: python benchmarks/tokenizer_bench.py [--vocab-size 3000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    import sentencepiece as spm
    from telechat_ms.data.train_tokenizer import DEMO_INPUTS, corpus_sentences, train_tokenizer

    sentences = list(corpus_sentences(map(str, DEMO_INPUTS)))
    ours, raw = [], []
    for _ in range(a.repeat):
        t = time.perf_counter()
        train_tokenizer(tempfile.mkdtemp(), vocab_size=a.vocab_size)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=io.BytesIO(),
                                       model_type="bpe", vocab_size=a.vocab_size, hard_vocab_limit=False,
                                       byte_fallback=True, split_digits=True, num_threads=1, minloglevel=2)
        raw.append(time.perf_counter() - t)
    o, r = statistics.median(ours), statistics.median(raw)
    print(f"train_tokenizer {o:.2f} s, SentencePiece trainer alone {r:.2f} s (median of {a.repeat}); "
          f"ratio {o / r:.2f}x on {len(sentences)} demo sentences, vocab {a.vocab_size}")


if __name__ == "__main__":
    main()
