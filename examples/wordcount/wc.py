"""Count the words of one slice of a text file: task k of K reads every K-th line starting at line k."""

import collections
import sys

part, parts = int(sys.argv[1]), int(sys.argv[2])
counts: collections.Counter[str] = collections.Counter()
with open("input.txt", encoding="utf-8") as text:
    for number, line in enumerate(text):
        if number % parts == part:
            counts.update(word.strip(".,;:!?\"'()").lower() for word in line.split())
counts.pop("", None)
with open(f"counts-{part}.tsv", "w", encoding="utf-8") as out:
    for word, n in counts.most_common():
        out.write(f"{word}\t{n}\n")
