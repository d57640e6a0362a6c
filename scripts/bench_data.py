"""SFT data at scale: checking and tokenizing a million chats, on every core, with a real tokenizer.

    python scripts/bench_data.py                  # 1,000,000 chats: about 45 minutes on 2 cores
    python scripts/bench_data.py --rows 20000     # a quick run
    python scripts/bench_data.py --quick          # smoke run: 200 chats, every phase (~15 s)
    python scripts/bench_data.py --rows 200000 --workers 1   # one core, for the scaling

What it measures, in this process and the worker processes it forks (posttrain's own code, as the SFT
stage and the runner call it):

1. pre-flight: the runner's check of every row (data/sources.py SourceRows with the SFT row schema,
   what `posttrain run` does before anything trains);
2. tokenize: data/tokenized.py as the SFT stage runs it on rank 0 -- every row checked again and
   tokenized (chat.tokenize_conversation + apply_truncation) into the Arrow cache;
3. read: the mixture opened from the cache (what every rank does) and 10,000 random examples read
   the way micro-batches read them;
4. cached: a second run finding the cache (locate + mixture).

For each: wall time, rows/s, and the peak memory of this process plus its workers, sampled every
0.2 s: the sum of RSS (counts pages the forked workers share with their parent once per process, an
upper bound) and the sum of PSS (shared pages split between the processes sharing them: the honest
total).

Data: --rows synthetic chats shaped like allenai/tulu-3-sft-mixture rows (`id`, `messages`, `source`),
seeded, written once as JSONL (generation is not timed): 1-4 user/assistant turns (55/25/12/8%), a
system prompt in 10%; message lengths log-normal (user median 200 characters, assistant median 800,
sigma 1.0, at most 20,000): about 2.9 KB of text a row, as the real mixture has (2.91 GB of Arrow
data in 939,343 rows). The text is English-like: the 20,000 commonest words of the vocabulary drawn
Zipf-wise, with sentences, paragraphs, numbers and a made-up word in 25.
Tokenizer: the real Qwen2 byte-level BPE (151,643 tokens + Qwen3's added tokens, from
tests/fixtures/tokenizers/) with posttrain's ChatML template (data/templates/chatml.jinja).
Settings: max_seq_len 4096 (Tulu 3's SFT), truncation truncate, multi_turn each.
Target (issue 16): 1M rows in < 10 minutes and < 4 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import REPO, text

sys.path.insert(0, str(REPO))


class PeakMemory:
    """Peak sum of RSS (sampled every 0.2 s, /proc/PID/statm) and of PSS (every 2 s: reading
    /proc/PID/smaps_rollup costs ~10 ms a process) over this process and its children; and the CPU
    seconds they used (getrusage: the children once they have exited)."""

    def __init__(self, every: float = 0.2, pss_every: int = 10):
        import psutil

        self.me, self.every, self.pss_every = psutil.Process(), every, pss_every
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, pss: bool) -> None:
        import psutil

        total_rss = total_pss = 0
        for p in [self.me] + self.me.children(recursive=True):
            try:
                total_rss += p.memory_info().rss
                if pss:
                    total_pss += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.rss = max(self.rss, total_rss)
        if pss:
            self.pss = max(self.pss, total_pss)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._sample(pss=n % self.pss_every == 0)
            n += 1
            self._stop.wait(self.every)

    @staticmethod
    def _cpu() -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))

    def __enter__(self):
        self.cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample(pss=True)
        self.cpu = self._cpu() - self.cpu0


def word_pool(tok, n: int = 20_000) -> list[str]:
    """The n most frequent whole words of the tokenizer's vocabulary (BPE merges come in frequency
    order: the lowest ids of "Ġword" tokens are the commonest English words)."""
    words = sorted((i, t[1:]) for t, i in tok.get_vocab().items() if re.fullmatch(r"Ġ[a-z]{2,}", t))
    return [w for _, w in words[:n]]


def make_text(rng: random.Random, words: list[str], size: int) -> str:
    """About `size` characters of English-like text: Zipf-distributed common words, with sentences,
    numbers, punctuation, a made-up word now and then and paragraphs."""
    weights = [1 / (r + 10) for r in range(len(words))]
    out, n, start = [], 0, True
    while n < size:
        for w in rng.choices(words, weights, k=64):
            if rng.random() < 0.02:
                w = str(rng.randint(0, 99999))
            elif rng.random() < 0.04:
                w = text(rng, rng.randint(4, 12)).replace(" ", "")
            if start:
                w, start = w.capitalize(), False
            r = rng.random()
            if r < 0.07:
                w, start = w + rng.choice(".?!"), True
            elif r < 0.12:
                w += rng.choice(",;:")
            out.append(w)
            n += len(w) + 1
            if start and rng.random() < 0.15:
                out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


def make_data(path: Path, n: int, words: list[str], seed: int = 0) -> None:
    """n tulu-3-sft-mixture-shaped chats as JSONL; each message a slice of a seeded text pool."""
    rng = random.Random(seed)
    # 16M characters (a 1M-row run); a smaller run needs less (the largest message is 20,000)
    pool = make_text(random.Random(seed + 1), words, min(16_000_000, max(200_000, 6_000 * n)))

    def piece(median: float) -> str:
        size = int(min(20_000, max(1, round(math.exp(rng.gauss(math.log(median), 1.0))))))
        at = rng.randrange(0, len(pool) - size)
        return pool[at:at + size].strip() or "ok"

    with path.open("w") as f:
        for i in range(n):
            messages = [{"role": "system", "content": piece(80)}] if rng.random() < 0.1 else []
            for _ in range(rng.choices((1, 2, 3, 4), (55, 25, 12, 8))[0]):
                messages += [{"role": "user", "content": piece(200)}, {"role": "assistant", "content": piece(800)}]
            f.write(json.dumps({"id": f"synthetic_{i}", "messages": messages, "source": "bench/synthetic"}) + "\n")


def bare_tokenizer_cpu(tok, data: Path, sample: int) -> float:
    """CPU seconds a row for the floor of any SFT tokenization: the conversation rendered once by the
    template and encoded once by the Rust tokenizer (no turn boundaries, no checks, no Arrow)."""
    with data.open() as f:
        rows = [json.loads(line)["messages"] for _, line in zip(range(sample), f)]
    t0 = time.process_time()
    for messages in rows:
        tok.backend_tokenizer.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    return (time.process_time() - t0) / len(rows)


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: every core)")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--tmp", default=None, help="where the data and the cache go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (the data is reused by --tmp)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 chats")
    a = ap.parse_args()
    if a.quick:
        a.rows = min(a.rows, 200)

    from posttrain_cli.data import sources, tokenized
    from posttrain_cli.data.chat import template_text
    from posttrain_cli.data.schemas import sft_messages
    from tests.fixtures.real import tokenizer

    tmp = Path(a.tmp) if a.tmp else Path(tempfile.mkdtemp(prefix="bench-data-"))
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / f"chats-{a.rows}.jsonl"
    try:
        tok = tokenizer("qwen2", template_text("chatml"))
        if not data.exists():
            t0 = time.perf_counter()
            make_data(data, a.rows, word_pool(tok))
            print(f"data: wrote {a.rows:,} chats, {data.stat().st_size / 2**20:,.0f} MiB, in "
                  f"{time.perf_counter() - t0:.0f}s (not timed below)", flush=True)
        workers = a.workers or sources.cpu_workers()
        src = {"path": str(data), "from": None, "split": "train", "name": None, "weight": 1.0}
        spec = tokenized.SftTokenization(tok, a.max_seq_len, "truncate", "each")
        cache = tmp / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        print(f"tokenizer: Qwen2 byte-level BPE ({len(tok):,} tokens) + ChatML; max_seq_len {a.max_seq_len}; "
              f"{workers} worker process(es) on {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}",
              flush=True)

        results = []

        def phase(name: str, fn):
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                out = fn()
                wall = time.perf_counter() - t0
            results.append((name, wall, mem))
            print(f"  {name:>10}: {wall:7.1f}s  {a.rows / wall:9,.0f} rows/s  CPU {mem.cpu:7.1f}s  "
                  f"peak RSS (sum) {gib(mem.rss)}, PSS (sum) {gib(mem.pss)}", flush=True)
            return out

        floor = bare_tokenizer_cpu(tok, data, sample=min(a.rows, 5000))
        print(f"the bare tokenizer: {floor * 1000:.2f} ms of CPU a row (each conversation rendered once and "
              f"encoded once, {min(a.rows, 5000):,} rows): {floor * a.rows:,.0f} CPU-s for {a.rows:,} rows, "
              f"{floor * a.rows / workers:,.0f}s on {workers} core(s) at best", flush=True)
        phase("pre-flight", lambda: len(sources.SourceRows(src, "data", sft_messages, workers=workers)))

        def build():
            (c,) = tokenized.locate([src], "data", spec, cache)
            c.build(workers=workers)
            return c

        phase("tokenize", build)

        def read():
            examples, stats = tokenized.mixture(tokenized.locate([src], "data", spec, cache), 0)
            rng = random.Random(0)
            n = sum(len(examples[rng.randrange(len(examples))][0]) for _ in range(10_000))
            return examples, stats, n

        examples, stats, _ = phase("read", read)
        phase("cached", lambda: tokenized.mixture(tokenized.locate([src], "data", spec, cache), 0)[1])

        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        print(f"\n{stats['rows']:,} chats -> {stats['examples']:,} examples, {stats['tokens']:,} tokens "
              f"({stats['tokens'] / stats['examples']:.0f} per example), {stats['loss_tokens']:,} carry loss, "
              f"{stats['truncated']:,} truncated; cache {size / 2**20:,.0f} MiB")
        check = sum(w for n, w, _ in results if n in ("pre-flight", "tokenize"))
        cpu = sum(m.cpu for n, _, m in results if n in ("pre-flight", "tokenize"))
        peak = max(m.pss for _, _, m in results)
        print(f"pre-flight + tokenize: {check:.0f}s wall ({a.rows / check:,.0f} rows/s), {cpu:,.0f} CPU-s "
              f"({cpu / a.rows * 1000:.2f} ms a row; the bare tokenizer {floor * 1000:.2f}), peak PSS {gib(peak)}, "
              f"RSS {gib(max(m.rss for _, _, m in results))}; load average now {os.getloadavg()[0]:.2f}")
        print("target (issue 16) for 1M rows on 2 cores: < 600 s and < 4 GB")
    finally:
        if a.keep or a.tmp:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
