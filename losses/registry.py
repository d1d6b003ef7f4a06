"""The registry of weighted loss terms: one entry per term, and everything that follows from it.

A term is a function of a `TermContext` (both models' tensors, the batch layout, the objective's options and
adapters) that returns an fp32 scalar with its graph, plus one `Term` entry. From the entry follow: the trainer's
flag ``--w-NAME`` (its default is ``weight``), the weighting in `AlignKDLoss`, the ``NAME`` key of every
log.jsonl record, the progress-bar field, the ablation runner's ``+NAME`` / ``-NAME`` arms, the gradient probe, and
which teacher tensors the teacher cache stores (``teacher``, fields of `KDSide`).

    register_term(Term("hidden_l2", lambda ctx: ctx.student.hidden.float().pow(2).mean(), weight=0.0,
                       help="mean square of the student's hidden states"))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .inputs import SIDE_FIELDS

if TYPE_CHECKING:
    from .objective import AlignKDLoss, TermContext


@dataclass(frozen=True)
class Term:
    name: str  # log key and progress-bar field; the flag is --w-NAME with "_" written "-"
    fn: Callable[["TermContext"], torch.Tensor]  # the unweighted value, fp32 scalar with its graph
    weight: float  # the trainer's default weight (0: computed and logged, no gradient)
    help: str = ""
    teacher: tuple[str, ...] = ()  # KDSide fields read from the teacher (the teacher cache stores them)
    # the term's own trainable module, made from the objective's sizes (teacher_heads, student_heads, teacher_dim,
    # student_dim) and options; None: the term trains nothing of its own
    adapter: Callable[["AlignKDLoss"], nn.Module] | None = None


TERMS: dict[str, Term] = {}  # in the order they are summed, logged and shown


def register_term(term: Term) -> Term:
    if term.name in TERMS or term.name in ("loss", "ce"):
        raise ValueError(f"a loss term named {term.name!r} exists already")
    unknown = set(term.teacher) - set(SIDE_FIELDS)
    if unknown:
        raise ValueError(f"term {term.name!r} reads unknown teacher fields {sorted(unknown)} (KDSide has "
                         f"{', '.join(SIDE_FIELDS)})")
    TERMS[term.name] = term
    return term


def flag(name: str) -> str:
    """The trainer's weight flag of a term."""
    return "--w-" + name.replace("_", "-")


def logged_terms() -> tuple[str, ...]:
    """The values of every micro-batch, in log order: the weighted total, CE, then each registered term."""
    return ("loss", "ce", *TERMS)


def teacher_fields() -> tuple[str, ...]:
    """The KDSide fields that the registered terms read from the teacher: what the teacher cache stores."""
    return tuple(f for f in SIDE_FIELDS if any(f in t.teacher for t in TERMS.values()))
