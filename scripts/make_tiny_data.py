"""Generate the shipped "tiny world" arithmetic data in posttrain_cli/data/tiny/.

Run from the repository root:

    python scripts/make_tiny_data.py

Deterministic (seeded): rerunning rewrites byte-identical files. Domains:

* ``add``: user ``"23+45"`` -> assistant ``"68"``, operands 0..99.
* ``sub``: user ``"71-45"`` -> assistant ``"26"``, operands 0..99, a >= b.

Held-out (a, b) pairs: ``sft_eval`` and ``pref_eval`` pairs never appear in
any training file (``sft_train``, ``pref_train``, ``rl_train``), and
``sub_eval`` pairs never appear in ``sub_sft_train`` or ``sub_rl_train``. Files:

* ``sft_train.jsonl``      {"messages": [user, assistant, (user, assistant)]}
                           (a few rows are two-turn chats)
* ``sft_eval.jsonl``       {"messages": [user], "ground_truth": "68", "dataset": "add"}
* ``rl_train.jsonl``       same schema as sft_eval
* ``pref_train.jsonl``     {"chosen": [user, assistant correct],
  ``pref_eval.jsonl``       "rejected": [user, assistant off by 1..3], "margin": 1..3}
* ``sub_sft_train.jsonl``  same schema as sft_train, subtraction
* ``sub_eval.jsonl``       same schema as sft_eval, "dataset": "sub"
* ``sub_rl_train.jsonl``   same schema as sub_eval (RL / distillation prompts, like rl_train)
* ``mopd_{add,sub}_train.jsonl``    SFT chats of the carry-free domains (recipes/tiny_mopd.yaml):
  ``mopd_{add,sub}_eval.jsonl``     addition without a carry (every digit sum <= 9: "23+45") and
  ``mopd_{add,sub}_prompts.jsonl``  subtraction without a borrow (every digit of a >= b's: "75-43"),
                                    3025 pairs each; eval pairs are in neither train nor prompts.
                                    A tiny model passes their plateau in ~300 SFT steps, not the
                                    ~500 of the full 0..99 domains, so two teachers and a student
                                    fit in a few CPU minutes.

Files added later draw from the random stream after every earlier file, so the
earlier files stay byte-identical.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "posttrain_cli" / "data" / "tiny"
SEED = 1234
MAX_OPERAND = 99  # operands are 0..MAX_OPERAND

N_SFT_EVAL = 200
N_PREF_EVAL = 200
N_SFT_TRAIN = 8000
N_MULTI_TURN = 200  # of the N_SFT_TRAIN rows, this many are two-turn chats
N_PREF_TRAIN = 4000
N_RL_TRAIN = 1000
N_SUB_TRAIN = 3000
N_SUB_EVAL = 200
N_SUB_RL_TRAIN = 1000
N_MOPD_EVAL = 200
N_MOPD_PROMPTS = 1000


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def add_q(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}", str(a + b)


def sub_q(a: int, b: int) -> tuple[str, str]:
    return f"{a}-{b}", str(a - b)


def chat(pairs, q) -> dict:
    msgs = []
    for a, b in pairs:
        prompt, answer = q(a, b)
        msgs += [user(prompt), assistant(answer)]
    return {"messages": msgs}


def prompt_row(a: int, b: int, q, dataset: str) -> dict:
    prompt, answer = q(a, b)
    return {"messages": [user(prompt)], "ground_truth": answer, "dataset": dataset}


def wrong_answer(rng: random.Random, correct: int) -> int:
    while True:
        w = correct + rng.choice([-3, -2, -1, 1, 2, 3])
        if w >= 0:
            return w


def pref_row(rng: random.Random, a: int, b: int) -> dict:
    prompt, answer = add_q(a, b)
    wrong = wrong_answer(rng, a + b)
    return {
        "chosen": [user(prompt), assistant(answer)],
        "rejected": [user(prompt), assistant(str(wrong))],
        # Llama 2's rating margin (an RM with `margin: true`): how far off the rejected sum is, 1-3.
        "margin": abs(wrong - (a + b)),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    # ---- addition ----------------------------------------------------------
    n = MAX_OPERAND + 1
    pairs = [(a, b) for a in range(n) for b in range(n)]
    rng.shuffle(pairs)
    eval_pairs = pairs[:N_SFT_EVAL]
    pref_eval_pairs = pairs[N_SFT_EVAL:N_SFT_EVAL + N_PREF_EVAL]
    pool = pairs[N_SFT_EVAL + N_PREF_EVAL:]  # everything a training file may use

    n_single = N_SFT_TRAIN - N_MULTI_TURN
    assert n_single + 2 * N_MULTI_TURN <= len(pool)
    singles = pool[:n_single]
    multi = pool[n_single:n_single + 2 * N_MULTI_TURN]
    sft_train = [chat([p], add_q) for p in singles]
    sft_train += [chat(multi[2 * i:2 * i + 2], add_q) for i in range(N_MULTI_TURN)]
    rng.shuffle(sft_train)

    write_jsonl(out / "sft_train.jsonl", sft_train)
    write_jsonl(out / "sft_eval.jsonl", [prompt_row(a, b, add_q, "add") for a, b in eval_pairs])
    write_jsonl(out / "rl_train.jsonl",
                [prompt_row(a, b, add_q, "add") for a, b in rng.sample(pool, N_RL_TRAIN)])
    write_jsonl(out / "pref_train.jsonl", [pref_row(rng, a, b) for a, b in rng.sample(pool, N_PREF_TRAIN)])
    write_jsonl(out / "pref_eval.jsonl", [pref_row(rng, a, b) for a, b in pref_eval_pairs])

    # ---- subtraction (second domain) ----------------------------------------
    sub_pairs = [(a, b) for a in range(n) for b in range(n) if a >= b]
    rng.shuffle(sub_pairs)
    sub_eval = sub_pairs[:N_SUB_EVAL]
    sub_train = sub_pairs[N_SUB_EVAL:N_SUB_EVAL + N_SUB_TRAIN]
    write_jsonl(out / "sub_sft_train.jsonl", [chat([p], sub_q) for p in sub_train])
    write_jsonl(out / "sub_eval.jsonl", [prompt_row(a, b, sub_q, "sub") for a, b in sub_eval])
    # Prompts for on-policy stages (MOPD's subtraction domain), from every non-eval pair.
    write_jsonl(out / "sub_rl_train.jsonl",
                [prompt_row(a, b, sub_q, "sub") for a, b in rng.sample(sub_pairs[N_SUB_EVAL:], N_SUB_RL_TRAIN)])

    # ---- carry-free addition, borrow-free subtraction (tiny MOPD) ------------
    domains = {
        "add": ([(a, b) for a, b in pairs if a % 10 + b % 10 <= 9 and a // 10 + b // 10 <= 9], add_q),
        "sub": ([(a, b) for a, b in sub_pairs if a % 10 >= b % 10 and a // 10 >= b // 10], sub_q),
    }
    for name, (domain, q) in domains.items():
        domain = sorted(domain)
        rng.shuffle(domain)
        held, train = domain[:N_MOPD_EVAL], domain[N_MOPD_EVAL:]
        write_jsonl(out / f"mopd_{name}_train.jsonl", [chat([p], q) for p in train])
        write_jsonl(out / f"mopd_{name}_eval.jsonl", [prompt_row(a, b, q, name) for a, b in held])
        write_jsonl(out / f"mopd_{name}_prompts.jsonl",
                    [prompt_row(a, b, q, name) for a, b in rng.sample(train, N_MOPD_PROMPTS)])

    for f in sorted(out.glob("*.jsonl")):
        print(f"{f.relative_to(out.parent.parent.parent)}: {sum(1 for _ in f.open())} rows, "
              f"{f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
