"""PromptInjectionGuard: veto commands that a text classifier labels as prompt injection.

The guard implements the documented classifier recipe: for each command it calls
``classifier(text, truncation=True)[0]``, lower-cases the predicted label and blocks when
the label is one of ``block_labels`` and the score reaches ``threshold``. ``classifier`` is
a transformers ``pipeline("text-classification", ...)`` or any callable returning the same
shape (``[{"label": str, "score": float}]``). This module imports no ML library: load the
model yourself, once, and pass it in::

    from transformers import pipeline
    clf = pipeline("text-classification", model="/path/to/model")
    vm = SmolVM(callbacks=[PromptInjectionGuard(clf, threshold=0.8)])
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from smolvm.callbacks import Callback, RunContext
from smolvm.exceptions import CommandBlockedError, ValidationError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_LABELS: frozenset[str] = frozenset({"malicious", "label_1", "injection"})


@dataclass(frozen=True)
class InjectionVerdict:
    """A flagged command: the label and score of the window that crossed the threshold."""

    label: str
    score: float
    threshold: float
    text: str  # the classified text (a window of the command when it is long)
    error: str | None = None  # set when the classifier failed and the guard fails closed

    @property
    def message(self) -> str:
        if self.error is not None:
            return f"Prompt-injection classifier failed ({self.error}); command blocked (fail_closed=True)."
        return (
            f"Prompt injection detected ({self.label}, score={self.score:.2f}, "
            f"threshold={self.threshold:.2f})."
        )


_SEPARATORS = (";", "\n", "&&", "||", "|")


def _head_cut(piece: str, size: int) -> int:
    """Where a window that starts mid-text should begin: after the first command separator
    in its first quarter, else after the first whitespace in its first eighth, else 0."""
    region = piece[: size // 4]
    hits = [region.find(sep) + len(sep) for sep in _SEPARATORS if sep in region]
    if hits:
        return min(hits)
    for i, ch in enumerate(piece[: size // 8]):
        if ch.isspace():
            return i + 1
    return 0


def _tail_cut(piece: str, size: int) -> int:
    """Where a window that stops mid-text should end (mirror of :func:`_head_cut`)."""
    lo = max(0, len(piece) - size // 4)
    hits = [piece.rfind(sep, lo) for sep in _SEPARATORS if piece.rfind(sep, lo) > 0]
    if hits:
        return max(hits)
    for i in range(len(piece) - 1, max(0, len(piece) - size // 8) - 1, -1):
        if piece[i].isspace():
            return i
    return len(piece)


class PromptInjectionGuard(Callback):
    """Pre-run veto of commands a classifier flags as prompt injection.

    Args:
        classifier: ``pipeline("text-classification", ...)`` or a callable with the same
            output shape. Called as ``classifier(text, truncation=True)``.
        threshold: minimum score (0..1) of a blocking label to veto.
        block_labels: labels (case-insensitive) that mean "injection". Different models
            name the positive class ``malicious``, ``injection`` or ``LABEL_1``.
        max_chars: commands longer than this are classified in windows of at most
            ``max_chars`` characters (overlapping by 1/8, edges moved to a command separator
            or whitespace), at most ``max_windows`` of them spread evenly and always
            including the start and the end; any flagged window blocks.
        max_windows: see ``max_chars``.
        fail_closed: when the classifier raises or returns an unexpected shape, block the
            command (default). With ``False`` the error is logged and the command runs.

    Thread-safe: calls into ``classifier`` are serialized with a lock (transformers
    pipelines are not safe to call concurrently).
    """

    def __init__(
        self,
        classifier: Callable[..., Any],
        *,
        threshold: float = 0.5,
        block_labels: Iterable[str] = DEFAULT_BLOCK_LABELS,
        max_chars: int = 2000,
        max_windows: int = 8,
        fail_closed: bool = True,
    ) -> None:
        if not callable(classifier):
            raise ValidationError(
                "classifier must be callable (e.g. a transformers pipeline)", field="classifier"
            )
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= float(threshold) <= 1.0
        ):
            raise ValidationError(
                f"threshold must be a number between 0 and 1, got {threshold!r}", field="threshold"
            )
        if isinstance(block_labels, str):
            block_labels = [block_labels]
        labels = frozenset(str(lbl).lower() for lbl in block_labels)
        if not labels:
            raise ValidationError("block_labels must name at least one label", field="block_labels")
        if not isinstance(max_chars, int) or max_chars < 16:
            raise ValidationError(f"max_chars must be an integer >= 16, got {max_chars!r}", field="max_chars")
        if not isinstance(max_windows, int) or max_windows < 1:
            raise ValidationError(
                f"max_windows must be an integer >= 1, got {max_windows!r}", field="max_windows"
            )
        self.classifier = classifier
        self.threshold = float(threshold)
        self.block_labels = labels
        self.max_chars = max_chars
        self.max_windows = max_windows
        self.fail_closed = fail_closed
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ scoring

    def windows(self, text: str) -> list[str]:
        """The pieces of ``text`` that are classified."""
        n, size = len(text), self.max_chars
        if n <= size:
            return [text]
        step = max(1, size - size // 8)
        starts = list(range(0, n - size + 1, step))
        if starts[-1] != n - size:
            starts.append(n - size)
        if len(starts) > self.max_windows:
            if self.max_windows == 1:
                starts = [0]
            else:
                k = self.max_windows
                starts = sorted({starts[round(i * (len(starts) - 1) / (k - 1))] for i in range(k)})
        out = []
        for s in starts:
            piece = text[s : s + size]
            if s > 0:
                piece = piece[_head_cut(piece, size) :]
            if s + size < n:
                piece = piece[: _tail_cut(piece, size)]
            out.append(piece.strip() or text[s : s + size])
        return out

    def predict(self, text: str) -> tuple[str, float]:
        """``(label, score)`` for one piece of text, label lower-cased."""
        with self._lock:
            out = self.classifier(text, truncation=True)
        pred = out[0] if isinstance(out, (list, tuple)) else out
        if isinstance(pred, (list, tuple)):  # top_k=None style output: pick the best
            pred = max(pred, key=lambda p: float(p["score"]))
        if not isinstance(pred, Mapping) or "label" not in pred or "score" not in pred:
            raise TypeError(f"classifier returned {type(pred).__name__}, expected {{'label', 'score'}}")
        return str(pred["label"]).lower(), float(pred["score"])

    def check(self, text: str) -> InjectionVerdict | None:
        """Return a verdict when ``text`` must be blocked, else None."""
        for piece in self.windows(text):
            try:
                label, score = self.predict(piece)
            except Exception as exc:
                if self.fail_closed:
                    return InjectionVerdict(
                        "error", 1.0, self.threshold, piece, error=f"{type(exc).__name__}: {exc}"
                    )
                log.warning("prompt-injection classifier failed, allowing command: %s", exc)
                return None
            if label in self.block_labels and score >= self.threshold:
                return InjectionVerdict(label, score, self.threshold, piece)
        return None

    # ------------------------------------------------------------------ hook

    def on_pre_run(self, ctx: RunContext) -> None:
        verdict = self.check(ctx.command)
        if verdict is None:
            return
        err = CommandBlockedError(verdict.message, vm_id=ctx.vm_id, command=ctx.command)
        err.details.update(
            guard=type(self).__name__,
            rule="prompt-injection",
            reason=verdict.message,
            label=verdict.label,
            score=verdict.score,
            threshold=verdict.threshold,
        )
        if verdict.error is not None:
            err.details["classifier_error"] = verdict.error
        err.verdict = verdict
        raise err

    def __repr__(self) -> str:
        return (
            f"PromptInjectionGuard(classifier={self.classifier!r}, threshold={self.threshold}, "
            f"block_labels={sorted(self.block_labels)})"
        )


__all__ = ["PromptInjectionGuard", "InjectionVerdict", "DEFAULT_BLOCK_LABELS"]
