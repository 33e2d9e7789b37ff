"""The unlearning data of a task as encoded training items, and the checks that it can work at all."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from harness import HarnessError
from harness.data import corpus
from harness.data.encode import chunk_corpus, encode_qa
from harness.data.splits import load_split
from harness.tasks import Task


def training_items(task: Task, tok, template, role: str, data_dir, limit, max_length):
    """``training.format: corpus``: the role's ``prompt.text`` texts as pretraining chunks of ``max_length``
    tokens; ``qa``: one item per row from ``prompt.question`` / ``prompt.answer``."""
    # a task resolved by `harness run` reads its pinned specs; otherwise a tiny model may use the task's fallback
    rows = corpus.corpus_rows(task, role, data_dir, tiny=corpus.is_tiny_model(getattr(tok, "name_or_path", None)))
    if limit:
        rows = rows[:limit]
    if not rows:
        raise HarnessError(f"task '{task.name}': data role '{role}' ({task.data[role].label()}) is empty")
    if task.train_format == "corpus":
        key = corpus.text_key(task, rows, role)
        return chunk_corpus(tok, [r[key] for r in rows if r[key]], max_length), rows
    q, a = task.field_name("question"), task.field_name("answer")
    for r in rows[:1]:
        for k in (q, a):
            if k not in r:
                raise HarnessError(f"task '{task.name}' ({task.file}): data role '{role}' has no field '{k}' "
                                   f"(fields: {', '.join(r)}); fix prompt.question/prompt.answer")
    return [encode_qa(tok, template, r[q], r[a], max_length=max_length) for r in rows], rows


def idk_items(task: Task, tok, template, forget_rows, data_dir, max_length):
    """``items[i][j]``: forget question i with idk answer j, encoded when first drawn (each example draws one
    alternative per epoch, so encoding all 100 answers for every row up front wastes nearly all of it)."""
    role, key = task.idk
    rows = load_split(task.data_spec(role), data_dir)
    if rows and key not in rows[0]:
        raise HarnessError(f"task '{task.name}' ({task.file}): data role '{role}' has no field '{key}' "
                           f"(fields: {', '.join(rows[0])}); fix training.idk")
    idk = [r[key] for r in rows]
    q = task.field_name("question")

    @functools.cache
    def encode(i: int, j: int) -> dict:
        return encode_qa(tok, template, forget_rows[i][q], idk[j], max_length=max_length)

    return [_Alternatives(len(idk), functools.partial(encode, i)) for i in range(len(forget_rows))]


@dataclass(frozen=True)
class _Alternatives(Sequence):
    """A read-only sequence whose items are built on access (``build`` memoises them)."""
    size: int
    build: Callable[[int], dict]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict:
        if not -self.size <= j < self.size:
            raise IndexError(j)
        return self.build(j % self.size)


def check_data(task: Task, data_dir, limit, start: str | None = None) -> None:
    """Fail before any model is loaded when the training data cannot work: an empty forget/retain split or
    rows without the fields the task's ``prompt`` names (``start``: the checkpoint, for a tiny fallback)."""
    corpus_task = task.train_format == "corpus"
    keys = [task.field_name("text")] if corpus_task else [task.field_name("question"), task.field_name("answer")]
    for role in ("forget", "retain"):
        if role not in task.data:
            raise HarnessError(f"task '{task.name}' ({task.file}): no data role '{role}'; unlearning needs "
                               "data.forget and data.retain")
        rows = corpus.corpus_rows(task, role, data_dir, tiny=corpus.is_tiny_model(start))
        if limit:
            rows = rows[:limit]
        if not rows:
            raise HarnessError(f"task '{task.name}': data role '{role}' ({task.data[role].label()}) is empty")
        for n, row in enumerate(rows):
            missing = [k for k in keys if k not in row]
            if missing:
                raise HarnessError(f"task '{task.name}' ({task.file}): data role '{role}' row {n} has no field "
                                   f"'{missing[0]}' (fields: {', '.join(row)}); fix prompt: in the task file")
