"""The Align-KD objective: `AlignKDLoss` and its registry of weighted terms (see losses/registry.py to add one)."""
from .inputs import KDBatch, KDSide
from .objective import ATTN_FORMS, PROJ_SIDES, AlignKDLoss, TermContext, head_average_init
from .registry import TERMS, Term, flag, logged_terms, register_term, teacher_fields
from . import terms as _builtin_terms  # noqa: F401  registers logit, attn, proj_all, proj_focus

__all__ = ["ATTN_FORMS", "PROJ_SIDES", "TERMS", "AlignKDLoss", "KDBatch", "KDSide", "Term", "TermContext", "flag",
           "head_average_init", "logged_terms", "register_term", "teacher_fields"]
