"""`--packing`: several examples in one sequence, none attending to another.

Examples are packed greedily, in order, into rows of at most --max-seq-len tokens. Each keeps its own
positions (0, 1, ... restarting per example) and attends only to itself: the batch carries an explicit
4D block-diagonal causal mask. Packed `position_ids` alone do not keep examples apart with sdpa in
transformers 5 (the second example's logits were 0.5 off); the mask does (tests/test_packing.py). The
first token of every example is never trained, so no label crosses a boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from prolora_cli.data.chat import IGNORE, column


def pack_ranges(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """[start, end) of the examples each packed row holds: greedily, in order, a row closing when the
    next example would not fit (an example longer than max_len gets a row of its own)."""
    starts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used and used + n > max_len:
            starts.append(i)
            used = 0
        used += n
    bounds = np.array([*starts, len(lengths)], dtype=np.int64)
    return np.stack([bounds[:-1], bounds[1:]], axis=1)


class PackedRows(torch.utils.data.Dataset):
    """Examples packed into rows, assembled when a row is asked for: memory holds the row ranges (two
    numbers a row), never the packed tokens."""

    def __init__(self, examples, max_len: int):
        lengths = column(examples, "length")
        self.examples = examples.with_format(None, columns=["input_ids", "labels"])
        self.ranges = pack_ranges(lengths, max_len)
        self.lengths = np.add.reduceat(lengths, self.ranges[:, 0]) if len(lengths) else lengths

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> dict:
        """One row: input_ids, labels (each example's first token untrained), position_ids restarting
        at each example."""
        start, end = (int(x) for x in self.ranges[i])
        chunk = self.examples[start:end]
        row: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in zip(chunk["input_ids"], chunk["labels"]):
            row["input_ids"] += ids
            row["labels"] += [IGNORE] + list(labels[1:])
            row["position_ids"] += list(range(len(ids)))
        return row


def collate_packed(pad_id: int):
    """Right-padded rows with a (batch, 1, L, L) bool mask: causal within each example only. A padding
    position attends to the row's first token (a row with nothing to attend to would give NaN)."""
    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            pos = torch.tensor(r["position_ids"])
            positions[i, :n] = pos
            example = torch.cumsum(pos == 0, 0)  # which example each token belongs to
            same = example[:, None] == example[None, :]
            mask[i, 0, :n, :n] = same & torch.ones(n, n, dtype=torch.bool).tril()
            mask[i, 0, n:, 0] = True
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}

    return fn


def seen_tokens(batch) -> int:
    """Tokens a batch really holds (not padding), packed or not."""
    mask = batch["attention_mask"]
    return int(mask.sum()) if mask.dim() == 2 else int(mask.diagonal(dim1=-2, dim2=-1).sum())
