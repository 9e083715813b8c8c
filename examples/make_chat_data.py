"""Write the small chat dataset in examples/chat/ (deterministic: same files on every run).

Four families of short tasks with one right answer in a fixed reply format, so a few dozen
training steps visibly lower the held-out loss. Some lines use the prompt/completion form.

    python examples/make_chat_data.py            # writes examples/chat/train.jsonl and dev.jsonl
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Austria": "Vienna", "Ireland": "Dublin", "Hungary": "Budapest", "Turkey": "Ankara", "Iran": "Tehran",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Argentina": "Buenos Aires",
    "Australia": "Canberra",
}
WORDS = ("apple river stone cloud paper garden window silver candle forest orange pencil bridge "
         "mountain rocket violin tiger planet ocean castle lemon thunder marble feather").split()


def arithmetic(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def reverse_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def spell(rng):
    word = rng.choice(WORDS)
    return f"Spell the word \"{word}\" letter by letter.", "-".join(word.upper())


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def make(n, rng):
    tasks = (arithmetic, reverse_words, spell, capital)
    lines = []
    for i in range(n):
        prompt, answer = tasks[i % len(tasks)](rng)
        if i % 5 == 4:
            lines.append({"prompt": prompt, "completion": answer})
        else:
            lines.append({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": answer}]})
    return lines


def prompt_of(row):
    return row.get("prompt") or row["messages"][0]["content"]


def main():
    out = Path(__file__).parent / "chat"
    out.mkdir(exist_ok=True)
    train = make(400, random.Random(0))
    seen = {prompt_of(r) for r in train}
    # Held-out means held out: no dev prompt appears in train (capitals repeat, so they drop out).
    dev = [r for r in make(100, random.Random(1)) if prompt_of(r) not in seen][:48]
    for name, rows in (("train", train), ("dev", dev)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} examples to {out / name}.jsonl")


if __name__ == "__main__":
    main()
