"""The local judge: a transformers model on this machine, scored from its exact next-token probabilities.

p(k) for a local judge is exact. Most small models' tokenizers split "85" into
"8", "5", so the first token's distribution alone only covers 0-9. We build a
trie of the token sequences of "0".."100" (as the judge would write them right
after its generation prompt, so tokenizers with multi-digit tokens work too)
and take, for the number k with tokens t1..tn::

    p(k) = P(t1) * P(t2 | t1) * ... * P(tn | t1..tn-1) * P(stop | t1..tn)

where "stop" means the next token does not start with a digit (it would make
a different, longer number). Prompts are prefilled in one left-padded batch
and the trie is then walked level by level, one forward per level for the
whole batch: every live node of the level becomes an extra query position in
its prompt's row, attending (through a custom 4D mask) to the prompt's KV
cache, to its own ancestors and to itself, at position prompt_len + depth - 1.
The prompt cache is shared, never copied. (For attention kernels without
custom masks, e.g. flash-attention, each node is instead a batch row holding a
copy of its parent's KV cache plus its token.) Branches whose prefix
probability is below ``min_prob`` (default 1e-6) are not expanded: each can
hide at most that much mass. ``min_prob=0`` is exact; tests compare both paths
with one full forward per number.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import PersonavecError
from .base import Judge, JudgeCache, _result
from .scoring import NUMBERS, is_yes_no, yes_no_result


class _NumberTrie:
    """Token sequences of "0".."100" as a trie; node 0 is the root (the judge's generation prompt)."""

    def __init__(self, tokenizer):
        from ..chat import prompt_text

        base = prompt_text(tokenizer, [{"role": "user", "content": "Answer with a number."}])
        base_ids = tokenizer(base, add_special_tokens=False)["input_ids"]

        def answer_ids(text: str) -> list[int]:
            # As the judge would write it after its generation prompt (the chat.py span rule).
            ids = tokenizer(base + text, add_special_tokens=False)["input_ids"]
            if ids[: len(base_ids)] == base_ids and len(ids) > len(base_ids):
                return ids[len(base_ids):]
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self.token, self.parent, self.depth, self.number = [-1], [-1], [0], [-1]
        self.children: list[list[int]] = [[]]
        index = {(): 0}
        for k, text in enumerate(NUMBERS):
            path: tuple[int, ...] = ()
            for tok in answer_ids(text):
                child = index.get(path + (tok,))
                if child is None:
                    child = len(self.token)
                    index[path + (tok,)] = child
                    parent = index[path]
                    self.token.append(tok)
                    self.parent.append(parent)
                    self.depth.append(self.depth[parent] + 1)
                    self.number.append(-1)
                    self.children.append([])
                    self.children[parent].append(child)
                path = path + (tok,)
            self.number[index[path]] = k
        self.max_depth = max(self.depth)
        self.at_depth = [[i for i, d in enumerate(self.depth) if d == depth] for depth in range(self.max_depth + 1)]
        refusal = answer_ids("REFUSAL")
        self.refusal_token = refusal[0] if refusal else -1


def _continues_number(tokenizer, size: int):
    """Bool mask over the vocabulary: tokens whose text starts with a digit (they would extend a number).

    Token strings, not decoded text: SentencePiece's "▁5" starts with a space marker and does
    not continue "8"; byte-level BPE keeps ASCII digits as themselves.
    """
    import torch

    mask = torch.zeros(size, dtype=torch.bool)  # the logits' width (may exceed the tokenizer's vocabulary)
    for token, i in tokenizer.get_vocab().items():
        if i < size and token[:1] and token[:1] in "0123456789":
            mask[i] = True
    return mask


def _select_cache(cache, index):
    """A new cache holding rows `index` of `cache` (which is left untouched)."""
    if not hasattr(cache, "layers"):
        raise PersonavecError("this judge model's KV cache type is not supported for batched judging")
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.batch_select_indices(index)
    return new


def _cat_caches(caches: list):
    import torch

    if len(caches) == 1:
        return caches[0]
    new = copy.copy(caches[0])
    new.layers = []
    for i, layer in enumerate(caches[0].layers):
        joined = copy.copy(layer)
        joined.keys = torch.cat([c.layers[i].keys for c in caches])
        joined.values = torch.cat([c.layers[i].values for c in caches])
        new.layers.append(joined)
    return new


class LocalJudge(Judge):
    """A transformers model scored from its next-token distributions (exact multi-digit numbers).

    `batch_size` prompts share one prefill; each trie level is then one forward
    over all their live branches (`tree`, the default with eager/SDPA attention)
    or forwards of at most `max_rows` branch rows with copied KV caches
    (`tree=False`). `max_rows` also bounds the rows of one log-softmax.
    """

    def __init__(self, model, tokenizer, spec: str | None = None, cache: JudgeCache | str | Path | None = None,
                 batch_size: int = 8, max_rows: int = 64, min_prob: float = 1e-6, tree: bool | None = None):
        from ..models import model_fingerprint

        super().__init__(cache)
        self.model, self.tokenizer = model, tokenizer
        self.spec = spec or f"local:{getattr(model, 'name_or_path', '') or type(model).__name__}"
        self.identity = model_fingerprint(model)
        self.batch_size, self.max_rows, self.min_prob = batch_size, max_rows, min_prob
        # Custom 4D masks work with the eager and SDPA kernels; others (flash-attention) get KV copies.
        attn = getattr(model.config, "_attn_implementation", None)
        self.tree = tree if tree is not None else attn in ("sdpa", "eager")
        self.trie = _NumberTrie(tokenizer)
        self.continues = _continues_number(tokenizer, model.get_output_embeddings().weight.shape[0])

    def context_length(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def too_long(self, prompt: str) -> bool:
        limit = self.context_length()
        # the number's tokens follow the prompt: the deepest trie level must fit as well
        return bool(limit) and len(self.prompt_ids(prompt)) + self.trie.max_depth > limit

    def prompt_ids(self, prompt: str) -> list[int]:
        from ..chat import prompt_text

        return self.tokenizer(prompt_text(self.tokenizer, [{"role": "user", "content": prompt}]),
                              add_special_tokens=False)["input_ids"]

    def _yes_no_ids(self):
        """Token ids that read "yes" / "no" in any case, with or without a leading space marker."""
        if getattr(self, "_yes_no", None) is None:
            size = self.model.get_output_embeddings().weight.shape[0]
            ids = {"yes": [], "no": []}
            for token, i in self.tokenizer.get_vocab().items():
                if i >= size or is_yes_no(token.lstrip("\u0120\u2581 ")) is None:
                    continue  # cheap filter on the raw token string (byte-level "Ġ", SentencePiece "▁")
                word = is_yes_no(self.tokenizer.decode([i]))
                if word:
                    ids[word].append(i)
            self._yes_no = {w: sorted(v) for w, v in ids.items()}
        return self._yes_no

    def yes_no_probs(self, prompts: Sequence[str]) -> list[tuple[float, float]]:
        """``[(P(Yes), P(No))]`` at the first answer token of each judge prompt, in one left-padded batch."""
        import torch

        ids = [self.prompt_ids(p) for p in prompts]
        n, width = len(ids), max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = self.model.device
        words = self._yes_no_ids()
        with torch.no_grad():
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=False, logits_to_keep=1)
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).double()
        sums = {}
        for w, toks in words.items():
            sums[w] = logp[:, toks].exp().sum(-1).cpu().tolist() if toks else [0.0] * n
        return list(zip(sums["yes"], sums["no"]))

    def _compute_yes_no(self, prompts, done):
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            batch = [prompts[i] for i in order[start: start + self.batch_size]]
            for prompt, (p_yes, p_no) in zip(batch, self.yes_no_probs(batch)):
                done(prompt, yes_no_result(p_yes, p_no))

    def _compute(self, prompts, done):
        # Similar lengths together: less padding in each batch.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            batch = [prompts[i] for i in order[start: start + self.batch_size]]
            probs, refused = self.number_probs(batch)
            for i, prompt in enumerate(batch):
                done(prompt, _result(probs[i].tolist(), refused[i]))

    def number_probs(self, prompts: Sequence[str]):
        """``(p [n, 101] float64, refused [n] bool)`` for judge prompts, in one batch."""
        import torch

        model, trie = self.model, self.trie
        device = model.device
        ids = [self.prompt_ids(p) for p in prompts]
        n, width = len(ids), max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding: every prompt ends at the last column
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        # Explicit positions, so padding never shifts a real token's position.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        state = _Walk(trie, n, self.min_prob, self.continues.to(device), device)

        with torch.no_grad():
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
            logp0 = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            top = logp0.argmax(-1).tolist()
            refused = [trie.refusal_token >= 0 and t == trie.refusal_token
                       and not bool(self.continues[trie.refusal_token]) for t in top]
            state.root(logp0)
            cache = out.past_key_values
            del out
            if self.tree:
                self._expand_tree(state, cache, mask)
            else:
                self._expand_branches(state, cache, mask)
        return torch.from_numpy(state.numbers), refused

    def _expand_tree(self, state: "_Walk", cache, mask) -> None:
        """All live nodes of a trie level are extra query positions of their prompt's row.

        Each attends to its prompt, its own ancestors (earlier levels' positions) and itself,
        through a custom 4D mask; all share the prompt's KV cache, which is never copied.
        """
        import torch

        model, trie, device = self.model, self.trie, state.device
        n, width = mask.shape
        lengths = mask.sum(-1)
        slot: dict[tuple[int, int], int] = {}  # (prompt, node) -> its column in the KV cache
        kv_len = width
        neg = torch.finfo(model.dtype).min
        for depth in range(1, trie.max_depth + 1):
            live = [state.live(b, depth) for b in range(n)]
            q = max(len(x) for x in live)
            if q == 0:
                break
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.full((n, q), pad, dtype=torch.long)
            allowed = torch.zeros((n, 1, q, kv_len + q), dtype=torch.bool)
            allowed[:, 0, :, :width] = mask[:, None, :].bool()
            for j in range(q):  # every position sees itself: no row is fully masked (pads included)
                allowed[:, 0, j, kv_len + j] = True
            rows = []
            for b, nodes in enumerate(live):
                for j, node in enumerate(nodes):
                    input_ids[b, j] = trie.token[node]
                    slot[(b, node)] = kv_len + j
                    ancestor = trie.parent[node]
                    while ancestor > 0:
                        allowed[b, 0, j, slot[(b, ancestor)]] = True
                        ancestor = trie.parent[ancestor]
                    rows.append((b, j, node))
            additive = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, neg)
            position_ids = (lengths + depth - 1)[:, None].expand(n, q)
            logits = model(input_ids=input_ids.to(device), attention_mask=additive.to(device),
                           position_ids=position_ids.to(device), past_key_values=cache, use_cache=True).logits
            for start in range(0, len(rows), self.max_rows):  # log-softmax in slices: [rows, vocab] can be big
                part = rows[start: start + self.max_rows]
                picked = logits[torch.tensor([b for b, _, _ in part]), torch.tensor([j for _, j, _ in part])]
                state.visit([(b, node) for b, _, node in part], picked)
            del logits
            kv_len += q

    def _expand_branches(self, state: "_Walk", cache, mask) -> None:
        """Fallback for attention kernels without custom masks: each live node is a batch row
        holding a copy of its parent's KV cache plus its token, `max_rows` rows per forward."""
        import torch

        model, trie, device = self.model, self.trie, state.device
        n = mask.shape[0]
        lengths = mask.sum(-1)
        parent_cache, parent_row = cache, {(b, 0): b for b in range(n)}
        for depth in range(1, trie.max_depth + 1):
            rows = [(b, node) for b in range(n) for node in state.live(b, depth)]
            if not rows:
                break
            pieces, kept_row, n_kept = [], {}, 0  # caches of rows whose children are expanded next
            for start in range(0, len(rows), self.max_rows):
                chunk = rows[start: start + self.max_rows]
                b_idx = torch.tensor([b for b, _ in chunk])
                cache = _select_cache(parent_cache, torch.tensor(
                    [parent_row[(b, trie.parent[node])] for b, node in chunk], device=device))
                step_mask = torch.cat([mask[b_idx], torch.ones((len(chunk), depth), dtype=torch.long)], dim=1)
                step = model(input_ids=torch.tensor([[trie.token[node]] for _, node in chunk], device=device),
                             attention_mask=step_mask.to(device),
                             position_ids=(lengths[b_idx] + depth - 1)[:, None].to(device),
                             past_key_values=cache, use_cache=True)
                keep = [r for r, expand in enumerate(state.visit(chunk, step.logits[:, -1])) if expand]
                for r in keep:
                    kept_row[chunk[r]] = n_kept
                    n_kept += 1
                if keep:
                    pieces.append(_select_cache(step.past_key_values, torch.tensor(keep, device=device)))
                del step, cache
            if not pieces:
                break
            parent_cache, parent_row = _cat_caches(pieces), kept_row


class _Walk:
    """Probabilities of trie nodes and numbers for a batch of prompts, filled level by level."""

    def __init__(self, trie: _NumberTrie, n: int, min_prob: float, continues, device):
        import torch

        self.trie, self.min_prob, self.continues, self.device = trie, min_prob, continues, device
        self.prob = np.zeros((n, len(trie.token)))  # P(prompt b's answer starts with the node's tokens)
        self.prob[:, 0] = 1.0
        self.numbers = np.zeros((n, 101))
        # Only the logprobs of tokens that appear in the trie leave the device.
        tokens = sorted(set(trie.token[1:]))
        self.column = {tok: j for j, tok in enumerate(tokens)}
        self.gather = torch.tensor(tokens, device=device)

    def root(self, logp0) -> None:
        first = logp0[:, self.gather].double().exp().cpu().numpy()
        for c in self.trie.children[0]:
            self.prob[:, c] = first[:, self.column[self.trie.token[c]]]

    def live(self, b: int, depth: int) -> list[int]:
        """Nodes at `depth` worth a forward for prompt b (prefix probability at least min_prob)."""
        p = self.prob[b]
        return [node for node in self.trie.at_depth[depth] if p[node] > 0 and p[node] >= self.min_prob]

    def visit(self, rows: list[tuple[int, int]], logits) -> list[bool]:
        """Take the next-token logits after (prompt, node) rows; return which rows have live children."""
        import torch

        trie = self.trie
        logp = torch.log_softmax(logits.float(), dim=-1)
        # P(stop) = exp(logsumexp over tokens that do not continue a number): accurate even when small.
        stop = torch.logsumexp(logp.masked_fill(self.continues, float("-inf")), dim=-1).double().exp().cpu().numpy()
        nxt = logp[:, self.gather].double().exp().cpu().numpy()
        expand = []
        for r, (b, node) in enumerate(rows):
            if trie.number[node] >= 0:
                self.numbers[b, trie.number[node]] += self.prob[b, node] * stop[r]
            for c in trie.children[node]:
                self.prob[b, c] = self.prob[b, node] * nxt[r, self.column[trie.token[c]]]
            expand.append(any(0 < self.prob[b, c] and self.prob[b, c] >= self.min_prob for c in trie.children[node]))
        return expand
