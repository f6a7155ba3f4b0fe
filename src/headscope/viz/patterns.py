"""Attention patterns over a prompt's real tokens, per head: computed from one forward run,
shown as a self-contained HTML view (Jupyter's ``_repr_html_``, the atlas report), a static SVG
(README pictures, GitHub) or a matplotlib query × key heatmap.

The HTML view, in the manner of CircuitsVis: the prompt's tokens in reading order, each coloured
by how much the chosen query token attends to it; hover (or tap) a token to make it the query;
one button per head. Its data and script are inline (no network at view time); without script
(a static renderer) it shows the last token's attention, coloured on the server side.
"""

from __future__ import annotations

import html
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from headscope.engine.heads import Head, all_heads, check_heads, heads_by_layer, hook_name
from headscope.engine.runner import forward_with_cache
from headscope.engine.tokens import TokenBatch, pad_rows, tokenize
from headscope.errors import EmptyResultError, HeadNotShownError, InputError, PromptTooLongError, ResultFileError
from headscope.models import model_name
from headscope.viz.figures import axes_for, finish

MAX_TOKENS = 96  # beyond this a pattern is unreadable as text; longer prompts are refused, never cut
NATURAL_SENTENCE = ("The cat sat on the mat because the mat was warm, and when the dog came in, "
                    "the cat moved to the chair.")

HeadLike = Union[Head, tuple[int, int], str]


@dataclass
class AttentionPatterns:
    """Where each of some heads attends on one prompt.

    Attributes:
        model: the model's name.
        tokens: the prompt's tokens as text (BOS included when the run had one).
        heads: the heads, in the order of ``values``.
        values: ``values[i, q, k]``: attention of head ``heads[i]`` from query position ``q`` to
            key position ``k`` (each row sums to 1 over ``k <= q``).
        title: what the prompt is (shown above the view).
    """

    model: str
    tokens: list[str]
    heads: list[Head]
    values: Float[Tensor, "heads query key"]
    title: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = (len(self.heads), len(self.tokens), len(self.tokens))
        if tuple(self.values.shape) != expected:
            raise InputError(f"AttentionPatterns values have shape {tuple(self.values.shape)}, expected {expected} "
                             "(heads, query, key) for these heads and tokens.")

    def __getitem__(self, head: HeadLike) -> Float[Tensor, "query key"]:
        """The ``[query, key]`` pattern of one head."""
        return self.values[self._index(head)]

    def _index(self, head: HeadLike) -> int:
        parsed = Head.parse(head)
        if parsed not in self.heads:
            raise HeadNotShownError(f"{parsed} is not in these patterns; they hold {', '.join(map(str, self.heads))}: "
                                    "draw it with hs.attention_patterns(model, prompt, heads=[...]).")
        return self.heads.index(parsed)

    def subset(self, heads: Sequence[HeadLike]) -> "AttentionPatterns":
        """The patterns of ``heads`` only (in that order), same tokens, title and notes."""
        index = [self._index(head) for head in heads]
        return AttentionPatterns(self.model, list(self.tokens), [self.heads[i] for i in index], self.values[index],
                                 self.title, dict(self.notes))

    def top_keys(self, head: HeadLike, query: int = -1, k: int = 3) -> list[tuple[int, str, float]]:
        """The ``k`` keys ``head`` attends to most from ``query``: ``(position, token, weight)``."""
        row = self[head][self.position(query)]
        weights, positions = row.topk(min(k, row.numel()))
        return [(int(p), self.tokens[int(p)], float(w)) for w, p in zip(weights, positions)]

    def position(self, query: int) -> int:
        """``query`` as a position from the start (negative counts from the end, as in Python).

        Raises:
            InputError: a position outside the prompt's tokens.
        """
        n = len(self.tokens)
        if not -n <= query < n:
            raise InputError(f"query position {query} is outside the prompt's {n} tokens: give 0..{n - 1}, or a "
                             "negative position counted from the end (-1 is the last token).")
        return query % n

    # ----- files -----------------------------------------------------------------------------
    def to_dict(self, decimals: int = 3) -> dict[str, Any]:
        """JSON-ready: the tokens and each head's lower-triangular rows, rounded."""
        rows = [[[round(float(v), decimals) for v in row[: q + 1]] for q, row in enumerate(pattern)]
                for pattern in self.values]
        return {"model": self.model, "title": self.title, "tokens": self.tokens,
                "heads": [str(h) for h in self.heads], "rows": rows, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttentionPatterns":
        """Patterns from :meth:`to_dict`'s output.

        Raises:
            ResultFileError: rows that do not fit the tokens (a cut-off or edited file).
        """
        n = len(data["tokens"])
        values = torch.zeros(len(data["heads"]), n, n)
        if len(data["rows"]) != len(data["heads"]):
            raise ResultFileError(f"attention patterns with {len(data['rows'])} row sets for {len(data['heads'])} heads")
        for index, rows in enumerate(data["rows"]):
            if [len(row) for row in rows] != list(range(1, n + 1)):
                raise ResultFileError(f"attention rows of {data['heads'][index]} do not fit the {n} tokens "
                                      "(each query q holds q + 1 keys)")
            for q, row in enumerate(rows):
                values[index, q, : q + 1] = torch.tensor(row, dtype=torch.float32)
        return cls(data["model"], list(data["tokens"]), [Head.parse(h) for h in data["heads"]], values,
                   data.get("title", ""), dict(data.get("notes", {})))

    # ----- pictures --------------------------------------------------------------------------
    def to_html(self, query: int = -1, view_id: Optional[str] = None) -> str:
        """The interactive view (self-contained: inline style, data and script), first showing the
        attention from ``query``. ``view_id``: the view's HTML id, unique on its page (default a
        random one; give a fixed one for output that is the same on every run)."""
        return pattern_view_html(self, query, view_id)

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_svg(self, head: Optional[HeadLike] = None, query: int = -1, width: int = 640) -> str:
        """A static picture of the view: tokens in reading order, coloured by ``head``'s attention
        from ``query`` (default the last token, outlined)."""
        return pattern_svg(self, self._index(head if head is not None else self.heads[0]), self.position(query), width)

    def plot(self, head: Optional[HeadLike] = None, ax: Any = None, path: Any = None, cmap: str = "Blues") -> Any:
        """Matplotlib heatmap of one head's pattern (query token down, key token across); saves
        to ``path`` if given; returns the figure."""
        head = Head.parse(head if head is not None else self.heads[0])
        n = len(self.tokens)
        figure, ax = axes_for(ax, (2.2 + 0.16 * n, 1.8 + 0.16 * n))
        image = ax.imshow(self[head].numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
        labels = [_short_token(t, 10) for t in self.tokens]
        step = max(1, n // 48)
        ax.set_xticks(range(0, n, step), labels[::step], rotation=90, fontsize=7)
        ax.set_yticks(range(0, n, step), labels[::step], fontsize=7)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        ax.set_title(f"{head} on {self.title or 'the prompt'}", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.04, label="attention")
        return finish(figure, path)

    def __repr__(self) -> str:
        return (f"AttentionPatterns(model={self.model!r}, heads=[{', '.join(map(str, self.heads))}], "
                f"tokens={len(self.tokens)}, title={self.title!r})")


def attention_patterns(
    model: Any,
    prompt: Union[str, Sequence[int], Tensor],
    heads: Optional[Sequence[HeadLike]] = None,
    title: str = "",
    prepend_bos: bool = True,
    max_tokens: int = MAX_TOKENS,
) -> AttentionPatterns:
    """The attention patterns of ``heads`` (default: every head) on ``prompt``: text (tokenized
    with BOS first unless ``prepend_bos=False``) or token ids (taken as they are).

    Raises:
        InputError: a prompt longer than ``max_tokens`` tokens (shorten it or raise the limit:
            a pattern that long does not read as text) or an empty one.
        EmptyResultError: a pattern that is not finite.
    """
    chosen = check_heads(model, list(heads)) if heads is not None else None
    batch = _prompt_batch(model, prompt, prepend_bos)
    length = int(batch.tokens.shape[1])
    if length > max_tokens:
        raise PromptTooLongError(f"The prompt has {length} tokens, more than max_tokens={max_tokens}: a pattern that long "
                         "does not read as text. Shorten the prompt or pass a larger max_tokens.")
    if chosen is None:
        chosen = all_heads(model)
    values = _patterns(model, batch, chosen)
    tokens = token_strings(model, batch.tokens[0].tolist())
    return AttentionPatterns(model_name(model), tokens, list(chosen), values, title)


def _prompt_batch(model: Any, prompt: Union[str, Sequence[int], Tensor], prepend_bos: bool) -> TokenBatch:
    if isinstance(prompt, str):
        return tokenize(model, prompt, prepend_bos=prepend_bos)
    ids = prompt.flatten().tolist() if isinstance(prompt, Tensor) else list(prompt)
    if isinstance(prompt, Tensor) and prompt.ndim == 2 and prompt.shape[0] != 1:
        raise InputError(f"attention_patterns takes one prompt; got a batch of {prompt.shape[0]} rows. Pass one row.")
    return pad_rows(model, [ids])


def _patterns(model: Any, batch: TokenBatch, heads: Sequence[Head]) -> Float[Tensor, "heads query key"]:
    layers = heads_by_layer(heads)
    names = [hook_name(layer, "pattern") for layer in layers]
    with torch.no_grad():
        _, cache = forward_with_cache(model, batch, names)
    values = torch.stack([cache[hook_name(h.layer, "pattern")][0, h.head].float().cpu() for h in heads])
    if not torch.isfinite(values).all():
        raise EmptyResultError("The attention patterns hold NaN or inf values: the model's forward pass is not "
                               "finite on this prompt (check its dtype and weights).")
    return values


def token_strings(model: Any, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it stands for (decoded one by one; ids without a tokenizer as ``#id``)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


# ----- rendering ---------------------------------------------------------------------------------
_STYLE = """
.hs-pv { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; font-size: 13px; color: #222;
         max-width: 900px; margin: 6px 0; }
.hs-pv .hs-title { color: #555; margin-bottom: 4px; }
.hs-pv .hs-heads button { font: inherit; margin: 0 4px 4px 0; padding: 1px 7px; border: 1px solid #bbb;
         border-radius: 3px; background: #f6f6f6; cursor: pointer; }
.hs-pv .hs-heads button.on { background: #1f4e8c; color: #fff; border-color: #1f4e8c; }
.hs-pv .hs-text { line-height: 1.9; }
.hs-pv .hs-tok { display: inline-block; line-height: 1.35; padding: 1px 1px; margin: 1px 1px; border-radius: 2px;
         white-space: pre; cursor: default; border: 1px solid transparent; }
.hs-pv .hs-tok.q { border-color: #d62728; }
.hs-pv .hs-note { color: #666; font-size: 11px; margin-top: 3px; }
"""

_SCRIPT = """
(function () {
  var root = document.getElementById(%(id)s);
  if (!root) { return; }
  var data = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
  var toks = root.querySelectorAll('.hs-tok'), buttons = root.querySelectorAll('.hs-heads button');
  var note = root.querySelector('.hs-note'), head = 0, query = data.query;
  function paint() {
    var row = data.rows[head][query];
    for (var k = 0; k < toks.length; k++) {
      var w = k < row.length ? row[k] : 0;
      toks[k].style.background = 'rgba(31,78,140,' + Math.min(1, w * 1.25).toFixed(3) + ')';
      toks[k].style.color = w > 0.45 ? '#fff' : '#222';
      toks[k].title = 'attention from the outlined token: ' + w.toFixed(3);
      toks[k].classList.toggle('q', k === query);
    }
    for (var b = 0; b < buttons.length; b++) { buttons[b].classList.toggle('on', b === head); }
    var best = 0;
    for (var j = 1; j < row.length; j++) { if (row[j] > row[best]) { best = j; } }
    note.textContent = data.heads[head] + ': query token ' + query + ' attends most to token ' + best +
      ' (' + row[best].toFixed(2) + '). Hover a token to make it the query.';
  }
  toks.forEach(function (t, k) {
    t.addEventListener('mouseenter', function () { query = k; paint(); });
    t.addEventListener('click', function () { query = k; paint(); });
  });
  buttons.forEach(function (b, i) { b.addEventListener('click', function () { head = i; paint(); }); });
  paint();
})();
"""


def pattern_view_html(patterns: AttentionPatterns, query: int = -1, view_id: Optional[str] = None) -> str:
    """The interactive view of ``patterns`` as one self-contained ``<div>`` (see
    :meth:`AttentionPatterns.to_html`)."""
    view_id = view_id or f"hs-pv-{uuid.uuid4().hex[:16]}"
    query = patterns.position(query)
    row = patterns.values[0, query]
    tokens = "".join(
        f"<span class='hs-tok{' q' if k == query else ''}' style='background:{_shade(float(row[k]))};"
        f"color:{'#fff' if float(row[k]) > 0.45 else '#222'}' title='{float(row[k]):.3f}'>{_token_html(t)}</span>"
        for k, t in enumerate(patterns.tokens))
    buttons = "".join(f"<button type='button'{' class=on' if i == 0 else ''}>{h}</button>"
                      for i, h in enumerate(patterns.heads))
    data = script_safe_json({**patterns.to_dict(), "query": query})
    title = f"<div class='hs-title'>{html.escape(patterns.title)}</div>" if patterns.title else ""
    return (f"<div class='hs-pv' id='{html.escape(view_id, quote=True)}'><style>{_STYLE}</style>{title}"
            f"<div class='hs-heads'>{buttons}</div><div class='hs-text'>{tokens}</div>"
            f"<div class='hs-note'>{patterns.heads[0]}: attention from the outlined token. "
            "Hover a token to make it the query.</div>"
            f"<script type='application/json'>{data}</script>"
            f"<script>{_SCRIPT % {'id': script_safe_json(view_id)}}</script></div>")


def script_safe_json(value: Any) -> str:
    """JSON that cannot end or re-open the ``<script>`` element it sits in: ``<``, ``>`` and ``&``
    written as ``\\u`` escapes (text such as ``<!--<script>`` would otherwise swallow the page)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def pattern_svg(patterns: AttentionPatterns, index: int, query: int = -1, width: int = 640) -> str:
    """Static SVG: the tokens wrapped into lines, each shaded by head ``index``'s attention from
    ``query`` (outlined in red)."""
    row = patterns.values[index, query]
    char, line_height, x, y = 7.2, 22, 6, 34
    parts = []
    for k, token in enumerate(patterns.tokens):
        shown = _visible(token)
        box = max(10.0, char * len(shown) + 6)
        if x + box > width - 6:
            x, y = 6, y + line_height
        weight = float(row[k])
        stroke = " stroke='#d62728' stroke-width='1.5'" if k == query else ""
        parts.append(f"<g><title>{html.escape(shown)}: {weight:.3f}</title><rect x='{x:.1f}' y='{y - 15}' "
                     f"width='{box:.1f}' height='19' rx='2' fill='{_shade(weight)}'{stroke}/>"
                     f"<text x='{x + 3:.1f}' y='{y}' fill='{'#fff' if weight > 0.45 else '#222'}'>"
                     f"{html.escape(shown)}</text></g>")
        x += box + 2
    height = y + 14
    head = patterns.heads[index]
    caption = (f"{patterns.model} {head}: attention from the outlined token"
               f"{' on ' + patterns.title if patterns.title else ''}")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
            "font-family='Menlo, Consolas, monospace' font-size='12'>"
            f"<rect width='{width}' height='{height}' fill='#fff'/>"
            f"<text x='6' y='14' font-family='Helvetica, Arial, sans-serif' fill='#444'>{html.escape(caption)}</text>"
            + "".join(parts) + "</svg>")


def _shade(weight: float) -> str:
    return f"rgba(31,78,140,{min(1.0, max(0.0, weight) * 1.25):.3f})"


def _visible(token: str) -> str:
    """A token as shown: newlines and tabs as symbols, an empty token as a middle dot."""
    shown = token.replace("\n", "⏎").replace("\t", "⇥")
    return shown if shown.strip() or not shown else shown.replace(" ", "·")


def _token_html(token: str) -> str:
    return html.escape(_visible(token)) or "∅"


def _short_token(token: str, limit: int) -> str:
    shown = _visible(token)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
