"""Align-KD losses in plain PyTorch: the readable specification.

Every fast path (the Triton kernels, the chunked logit-KD) is tested against these functions, and these functions are
tested against naive fully materialized computations (tests/test_reference.py). Inputs may be bf16/fp16; all math is
fp32. Teacher tensors never receive gradients.

Notation
--------
q, k: [B, H, L, D] layer-0 queries/keys after RoPE, k already repeated to q's heads.
P = softmax(q k^T / sqrt(D)) over keys j with the causal mask (j <= i) and the padding mask (attention_mask[b, j]
    marks valid keys; None: every key valid). A query row without any valid key has P = 0.
E = {(b, i, j): text_mask[b, i] and vision_mask[b, j] and j < i}: text queries attending to earlier vision keys.
    E depends on the masks only (not on attention_mask); a padded vision key inside E simply has P = 0.
teacher_lse: optional [B, Ht, L] fp32, the teacher's row log-sum-exps (natural log) of q k^T / sqrt(D) over each
    row's causal, valid keys (``attention_row_lse``; -inf for a row without keys). Given it, P_t on E is
    exp(q_i k_j / sqrt(D) - lse_i) and k_t is read at the vision columns only, so a teacher cache can store the keys
    of the 144 vision positions instead of all L.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention_alignment_loss",
    "attention_alignment_and_focus",
    "text_focus",
    "attention_row_lse",
    "attention_kl_loss",
    "projection_kd_loss",
    "student_projection_kd_loss",
    "logit_kd_loss",
]


# --------------------------------------------------------------------------------------------------------------------
# attention alignment and text focus


def _positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted positions of the True entries of each row of mask [B, L] -> (pos [B, N] long, ok [B, N] bool).

    N is the largest count over the batch; rows with fewer entries are padded with position 0 and ok=False.
    """
    mask = mask.bool()
    B, L = mask.shape
    counts = mask.sum(1)
    n = int(counts.max()) if B > 0 else 0
    # a stable sort of "not in mask" puts the masked positions first, in increasing order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :n]
    ok = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
    return torch.where(ok, order, torch.zeros_like(order)), ok


def _allowed(rows, L, attention_mask):
    """[B, T, L] bool: key j is causal (j <= i) and valid for query row i."""
    key_pos = torch.arange(L, device=rows.device)
    allowed = key_pos[None, None, :] <= rows[:, :, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed


def _row_scores(q, k, rows):
    """fp32 scores q_i k_n / sqrt(D) of the query rows `rows` [B, T] against every key of k [B, H, N, D]:
    [B, H, T, N]."""
    B, H, L, D = q.shape
    q_rows = q.float().gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], D))  # [B, H, T, D]
    return q_rows @ k.float().transpose(-1, -2) / math.sqrt(D)


def _text_vision_probs(q, k, rows, cols, attention_mask, lse=None) -> torch.Tensor:
    """P restricted to the given query rows and key columns: [B, H, T, V] fp32.

    The softmax runs over *all* keys of each row (causal + padding mask), then the vision columns are picked out, so
    the result is the true attention probability, not a renormalized slice. With `lse` ([B, H, L], see the module
    docstring) the normalizer is given: only the key columns `cols` of k are read.
    """
    B, H, L, D = q.shape
    T, V = rows.shape[1], cols.shape[1]
    if lse is not None:
        k_cols = k.float().gather(2, cols[:, None, :, None].expand(B, H, V, D))  # [B, H, V, D]
        s = _row_scores(q, k_cols, rows)  # [B, H, T, V]
        lse_rows = lse.float().gather(2, rows[:, None, :].expand(B, H, T))[..., None]  # [B, H, T, 1]
        ok = _allowed(rows, L, attention_mask).gather(2, cols[:, None, :].expand(B, T, V))[:, None] \
            & torch.isfinite(lse_rows)
        return torch.where(ok, torch.exp(s - torch.where(ok, lse_rows, torch.zeros_like(lse_rows))),
                           torch.zeros_like(s))
    scores = _row_scores(q, k, rows)  # [B, H, T, L]
    allowed = _allowed(rows, L, attention_mask)  # [B, T, L]
    row_has_key = allowed.any(-1)  # [B, T]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    # rows without any valid key: softmax of a finite row, then zeroed (keeps NaN out of forward and backward)
    scores = scores.masked_fill(~row_has_key[:, None, :, None], 0.0)
    probs = torch.softmax(scores, dim=-1) * row_has_key[:, None, :, None]
    return probs.gather(3, cols[:, None, None, :].expand(B, H, T, V))  # [B, H, T, V]


@torch.no_grad()
def attention_row_lse(q, k, row_mask, attention_mask=None) -> torch.Tensor:
    """[B, H, L] fp32: log-sum-exp (natural log) of q_i k_j / sqrt(D) over the causal, valid keys j of every row i
    in row_mask [B, L]; -inf for other rows and for rows without a valid key (no probability mass)."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q, k must be [B, H, L, D] with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, L, _ = q.shape
    rows, ok = _positions(row_mask)
    scores = _row_scores(q, k, rows).masked_fill(~_allowed(rows, L, attention_mask)[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1).masked_fill(~ok[:, None, :], float("-inf"))  # [B, H, T]
    out = torch.full((B, H, L + 1), float("-inf"), dtype=torch.float32, device=q.device)
    dest = torch.where(ok, rows, torch.full_like(rows, L))[:, None, :].expand(B, H, rows.shape[1])
    return out.scatter_(2, dest, lse)[..., :L].contiguous()  # padding slots land in the dropped column L


def _pair_set(text_mask, vision_mask):
    """Compact rows (text positions), columns (vision positions) and the pair mask E over them: [B, T, V] bool."""
    rows, row_ok = _positions(text_mask)
    cols, col_ok = _positions(vision_mask)
    pairs = row_ok[:, :, None] & col_ok[:, None, :] & (cols[:, None, :] < rows[:, :, None])
    return rows, cols, pairs


def _check_qk(q_t, k_t, q_s=None, k_s=None):
    if q_t.dim() != 4 or q_t.shape[:3] != k_t.shape[:3] or q_t.shape[-1] != k_t.shape[-1]:
        raise ValueError(f"q_t, k_t must be [B, H, L, D] with equal shapes, got {tuple(q_t.shape)}, {tuple(k_t.shape)}")
    if q_s is not None:
        if q_s.dim() != 4 or q_s.shape != k_s.shape:
            raise ValueError(f"q_s, k_s must be [B, H, L, D] with equal shapes, got {tuple(q_s.shape)}, "
                             f"{tuple(k_s.shape)}")
        if q_s.shape[0] != q_t.shape[0] or q_s.shape[2] != q_t.shape[2]:
            raise ValueError("teacher and student q/k must share batch size and sequence length")


def attention_alignment_and_focus(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask=None,
                                  teacher_lse=None):
    """(L_attn, F): the attention alignment loss and the teacher's text focus from one pass.

    L_attn = mean over (b, i, j) in E and student heads hs of
             ( sum_ht weight[hs, ht] * P_t[b, ht, i, j] + bias[hs] - P_s[b, hs, i, j] )^2
    i.e. sum over E x Hs of the squared difference divided by |E| * Hs. weight [Hs, Ht], bias [Hs] is the 1x1 conv
    over heads. An empty E gives a zero fp32 scalar that still backpropagates (zero gradients).

    F[b, j] = (1 / Ht) * sum_ht sum_{i: (b, i, j) in E} P_t[b, ht, i, j] for vision keys j, 0 elsewhere: [B, L] fp32.

    Gradients flow to q_s, k_s, weight and bias; q_t and k_t are constants. teacher_lse: see the module docstring.
    """
    _check_qk(q_t, k_t, q_s, k_s)
    Hs, Ht = q_s.shape[1], q_t.shape[1]
    if tuple(weight.shape) != (Hs, Ht) or tuple(bias.shape) != (Hs,):
        raise ValueError(f"weight must be [Hs, Ht] = [{Hs}, {Ht}] and bias [{Hs}], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    rows, cols, pairs = _pair_set(text_mask, vision_mask)
    with torch.no_grad():
        p_t = _text_vision_probs(q_t.detach(), k_t.detach(), rows, cols, attention_mask, teacher_lse)  # [B,Ht,T,V]
    p_s = _text_vision_probs(q_s, k_s, rows, cols, attention_mask)  # [B, Hs, T, V]
    target = torch.einsum("sh,bhtv->bstv", weight.float(), p_t) + bias.float()[None, :, None, None]
    sq = (target - p_s).pow(2) * pairs[:, None]  # [B, Hs, T, V], zero outside E
    n = int(pairs.sum()) * Hs
    loss = sq.sum() / max(n, 1)  # empty E: an exact zero that is still part of the graph
    focus = _scatter_focus(p_t, rows, cols, pairs, text_mask.shape[1])
    return loss, focus


def _scatter_focus(p_t, rows, cols, pairs, L):
    B, Ht = p_t.shape[:2]
    per_col = (p_t * pairs[:, None]).sum(dim=(1, 2)) / Ht  # [B, V]; padded columns have no pairs -> 0
    focus = torch.zeros(B, L, dtype=torch.float32, device=p_t.device)
    return focus.scatter_add_(1, cols, per_col)


def attention_alignment_loss(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask=None,
                             teacher_lse=None):
    """L_attn (fp32 scalar): see ``attention_alignment_and_focus``."""
    return attention_alignment_and_focus(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask,
                                         teacher_lse)[0]


@torch.no_grad()
def text_focus(q_t, k_t, text_mask, vision_mask, attention_mask=None, teacher_lse=None):
    """Text focus F [B, L] fp32 of the teacher (no gradient):

    F[b, j] = (1 / Ht) * sum_ht sum_{i: (b, i, j) in E} P_t[b, ht, i, j] for vision keys j, and 0 elsewhere.
    The focus set of a sample is the top-K vision tokens by F.
    """
    _check_qk(q_t, k_t)
    rows, cols, pairs = _pair_set(text_mask, vision_mask)
    p_t = _text_vision_probs(q_t, k_t, rows, cols, attention_mask, teacher_lse)
    return _scatter_focus(p_t, rows, cols, pairs, text_mask.shape[1])


def _vision_log_probs(q, k, rows, cols, valid) -> torch.Tensor:
    """log Pv [B, H, T, V] fp32: log-softmax of the scores of the query rows `rows` over each row's vision keys only
    (valid [B, T, V] marks V_i), 0 outside V_i. Only the key columns `cols` of k are read."""
    B, H, _, D = k.shape
    V = cols.shape[1]
    k_cols = k.float().gather(2, cols[:, None, :, None].expand(B, H, V, D))  # [B, H, V, D]
    s = _row_scores(q, k_cols, rows).masked_fill(~valid[:, None], float("-inf"))
    # rows with an empty V_i: a finite row (keeps NaN out of forward and backward), masked below
    s = s.masked_fill(~valid.any(-1)[:, None, :, None], 0.0)
    logp = s - torch.logsumexp(s, -1, keepdim=True)
    return torch.where(valid[:, None], logp, torch.zeros_like(logp))


def attention_kl_loss(q_t, k_t, q_s, k_s, text_mask, vision_mask, mix, attention_mask=None):
    """Normalized attention alignment ("attention KL"): fp32 scalar.

    The MSE of ``attention_alignment_loss`` compares probabilities of order 1/L; this compares *distributions over
    the vision keys*, so it is O(1). q_t, k_t [B, Ht, L, D_t], q_s, k_s [B, Hs, L, D_s] as above; mix [Hs, Ht]
    mixes teacher heads (the caller passes a row-stochastic one, e.g. a softmax; nothing here assumes it).

    V_i = {j : vision_mask[b, j], j < i, attention_mask[b, j] (if given)} for each text row i (text_mask[b, i]);
        rows with an empty V_i are left out.
    Pv[b, h, i, j] = exp(s_ij - lseV_i) for j in V_i, s_ij = q_i k_j / sqrt(D), lseV_i = logsumexp_{j in V_i} s_ij:
        softmax restricted to the vision keys (P renormalized over V_i), for teacher heads and student heads.
    m[b, hs, i, j] = sum_ht mix[hs, ht] Pv_t[b, ht, i, j]: the target of student head hs.
    L = mean over (b, i with V_i non-empty, hs) of KL(m || Pv_s) = sum_{j in V_i} m_ij (log m_ij - log Pv_s_ij),
        i.e. the sum divided by (number of such rows) * Hs.
    0 log 0 = 0: the entropy term m log m counts only where m_ij > 0 and has no derivative elsewhere (so a mix with
    zeros gives finite gradients); -m log Pv_s is linear in m and counts everywhere. (m < 0 only comes from a mix
    with negative entries; m log m is then taken as 0 as well.) Math in fp32; inputs may be bf16/fp16.
    An empty set of rows gives an exact zero fp32 scalar that still backpropagates (zero gradients).

    Gradients flow to q_s, k_s and mix; q_t, k_t are constants. With N = rows * Hs:
        dL/ds_s_ij = ((sum_j' m_ij') Pv_s_ij - m_ij) / N on V_i, so only vision columns get dk_s, only text rows dq_s;
        dL/dmix[hs, ht] = sum_{b, i, j in V_i} Pv_t[b, ht, i, j] ([m_ij > 0] (log m_ij + 1) - log Pv_s_ij) / N
        (= sum Pv_t (log m + 1 - log Pv_s) / N when every m_ij > 0, as with a softmax mix).
    The teacher side needs its queries at the text rows and its keys at the vision columns only (no full-row LSE):
    a teacher cache that stores k_t at the vision positions is enough.
    """
    _check_qk(q_t, k_t, q_s, k_s)
    Hs, Ht = q_s.shape[1], q_t.shape[1]
    if tuple(mix.shape) != (Hs, Ht):
        raise ValueError(f"mix must be [Hs, Ht] = [{Hs}, {Ht}], got {tuple(mix.shape)}")
    rows, cols, valid = _pair_set(text_mask, vision_mask)  # [B, T, V]: vision j < text i
    if attention_mask is not None:
        valid = valid & attention_mask.bool().gather(1, cols)[:, None, :]
    with torch.no_grad():
        p_t = _vision_log_probs(q_t.detach(), k_t.detach(), rows, cols, valid).exp() * valid[:, None]
    logp_s = _vision_log_probs(q_s, k_s, rows, cols, valid)  # 0 outside V_i, where m = 0 too
    m = torch.einsum("sh,bhtv->bstv", mix.float(), p_t)  # [B, Hs, T, V]
    pos = (m > 0) & valid[:, None]
    m_log_m = torch.where(pos, m * torch.where(pos, m, torch.ones_like(m)).log(), torch.zeros_like(m))
    n = int(valid.any(-1).sum()) * Hs
    return (m_log_m - m * logp_s).sum() / max(n, 1)  # no rows: an exact zero that is still part of the graph


# --------------------------------------------------------------------------------------------------------------------
# projection KD


def projection_kd_loss(f_t, f_s, weight, bias, focus_idx=None):
    """(L_proj_all, L_proj_focus) for the projection adapter A(x) = x @ weight.T + bias.

    f_t [B, N, d_t] teacher vision tokens (constant), f_s [B, N, d_s] student vision tokens, weight [d_s, d_t],
    bias [d_s]. With R = A(f_t) - f_s (fp32):
      loss_all   = mean of R^2 over all B * N * d_s entries;
      loss_focus = mean of R^2 over the tokens focus_idx[b, :] of every sample (focus_idx [B, K] long into 0..N-1;
                   gather semantics: a repeated index counts twice), i.e. sum / (B * K * d_s).
    With focus_idx None, loss_focus is a constant zero fp32 scalar (no graph). With B = 0 both are zero.
    Gradients flow to f_s, weight and bias.
    """
    if f_t.dim() != 3 or f_s.dim() != 3 or f_t.shape[:2] != f_s.shape[:2]:
        raise ValueError(f"f_t [B, N, d_t] and f_s [B, N, d_s] expected, got {tuple(f_t.shape)}, {tuple(f_s.shape)}")
    if tuple(weight.shape) != (f_s.shape[2], f_t.shape[2]) or tuple(bias.shape) != (f_s.shape[2],):
        raise ValueError(f"weight must be [d_s, d_t] = [{f_s.shape[2]}, {f_t.shape[2]}] and bias [{f_s.shape[2]}]")
    r2 = (f_t.detach().float() @ weight.float().t() + bias.float() - f_s.float()).pow(2)  # [B, N, d_s]
    loss_all = r2.sum() / max(r2.numel(), 1)
    if focus_idx is None:
        return loss_all, torch.zeros((), dtype=torch.float32, device=f_s.device)
    if focus_idx.dim() != 2 or focus_idx.shape[0] != f_t.shape[0]:
        raise ValueError(f"focus_idx must be [B, K], got {tuple(focus_idx.shape)}")
    picked = r2.gather(1, focus_idx.long()[:, :, None].expand(-1, -1, r2.shape[2]))  # [B, K, d_s]
    return loss_all, picked.sum() / max(picked.numel(), 1)


def student_projection_kd_loss(f_t, f_s, weight, bias, focus_idx=None, focus_rows=None):
    """(L_proj_all, L_proj_focus) with the adapter on the student's side: A(x) = x @ weight.T + bias maps the student's
    tokens to the teacher's width, weight [d_t, d_s], bias [d_t]. With R = A(f_s) - f_t (fp32):
      loss_all   = mean of R^2 over all B * N * d_t entries;
      loss_focus = mean of R^2 over the tokens focus_idx[k, :] of the samples selected by focus_rows ([B] bool;
                   None: all B samples, focus_idx then [B, K]); gather semantics. focus_idx None: a zero that still
                   backpropagates.
    Gradients flow to f_s (through A), weight and bias. Plain PyTorch on every backend: [B, N, d_t] fp32 is a few MB
    at MobileVLM's shapes (144 tokens x 4096), so there is nothing to fuse away.
    """
    if f_t.dim() != 3 or f_s.dim() != 3 or f_t.shape[:2] != f_s.shape[:2]:
        raise ValueError(f"f_t [B, N, d_t] and f_s [B, N, d_s] expected, got {tuple(f_t.shape)}, {tuple(f_s.shape)}")
    if tuple(weight.shape) != (f_t.shape[2], f_s.shape[2]) or tuple(bias.shape) != (f_t.shape[2],):
        raise ValueError(f"weight must be [d_t, d_s] = [{f_t.shape[2]}, {f_s.shape[2]}] and bias [{f_t.shape[2]}]")
    r2 = (f_s.float() @ weight.float().t() + bias.float() - f_t.detach().float()).pow(2)  # [B, N, d_t]
    loss_all = r2.sum() / max(r2.numel(), 1)
    if focus_idx is None:
        return loss_all, loss_all * 0.0
    sub = r2 if focus_rows is None else r2[focus_rows.bool()]
    if focus_idx.dim() != 2 or focus_idx.shape[0] != sub.shape[0]:
        raise ValueError(f"focus_idx must be [selected samples, K], got {tuple(focus_idx.shape)}")
    picked = sub.gather(1, focus_idx.long()[:, :, None].expand(-1, -1, sub.shape[2]))
    return loss_all, picked.sum() / max(picked.numel(), 1)


# --------------------------------------------------------------------------------------------------------------------
# logit KD


def logit_kd_loss(h_s, w_s, h_t, w_t, kind="forward", temperature=1.0):
    """Logit distillation over already selected rows (fp32 scalar).

    h_s [N, d_s] and h_t [N, d_t] are the final normed hidden states of the same N positions, w_s [V, d_s] and
    w_t [V, d_t] the lm_head weights. z = h @ w.T / temperature in fp32, p = softmax(z) over the full vocabulary.
      kind="forward": mean over rows of KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)
      kind="reverse": mean over rows of KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)
    No T^2 factor. N = 0 gives a zero scalar that still backpropagates. Gradients flow to h_s and w_s only.
    This materializes [N, V] fp32 logits of both models: it is the specification, not the fast path.
    """
    if kind not in ("forward", "reverse"):
        raise ValueError(f"kind must be 'forward' or 'reverse', got {kind!r}")
    if h_s.dim() != 2 or h_t.dim() != 2 or h_s.shape[0] != h_t.shape[0]:
        raise ValueError(f"h_s [N, d_s] and h_t [N, d_t] expected, got {tuple(h_s.shape)}, {tuple(h_t.shape)}")
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {w_s.shape[0]} vs {w_t.shape[0]}")
    logp_s = F.log_softmax(h_s.float() @ w_s.float().t() / temperature, dim=-1)
    with torch.no_grad():
        logp_t = F.log_softmax(h_t.detach().float() @ w_t.detach().float().t() / temperature, dim=-1)
    if kind == "forward":
        per_row = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    else:
        per_row = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    return per_row.sum() / max(per_row.shape[0], 1)
