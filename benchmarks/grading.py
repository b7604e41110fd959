"""Answer extraction and equivalence checking.

Extraction is ours (last ``\\boxed{}``/``\\fbox{}`` with balanced braces, else a
final "answer is ..." line) so the log shows exactly which string was graded.
Equivalence is delegated to ``math-verify`` (HuggingFace's maintained checker:
it parses LaTeX into sympy and compares sets, intervals, matrices, fractions
vs decimals, units and text answers), because hand-written normalisers are
where benchmark numbers silently drift between projects.

``math-verify`` bounds its own work with ``signal.alarm``, which only works in
a process's main thread, and some inputs (``9^{9^{9^{9}}}``) would otherwise
run for minutes. :class:`Grader` therefore runs every check in the main thread
of a worker *process*, and the parent additionally enforces a wall-clock limit
per item: a worker that overruns (e.g. stuck in C code that signals cannot
interrupt) is killed and replaced, and the item is graded wrong with
``method="timeout"``. Nothing a completion contains can hang the run.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from multiprocessing.connection import Connection
from typing import Any, Literal

GraderKind = Literal["math", "numeric", "choice"]
GradeMethod = Literal[
    "math_verify",
    "numeric",
    "string",
    "letter",
    "no_answer",
    "unparsed",
    "judge",
    "timeout",
    "error",
]
"""How a verdict was reached. ``unparsed``: math-verify found no math expression in the answer
or the gold and compared strings (that verdict stands, unless an LLM judge is set: it then
decides, ``judge``)."""

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(
    r"answer\s*(?:is|:)\s*[:\s]*(.+?)\s*$", flags=re.IGNORECASE | re.MULTILINE
)


# ------------------------------------------------------------------ extraction
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` whose braces balance.

    An unterminated box (a truncated completion) is skipped in favour of an
    earlier complete one, rather than returning half an expression.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        i = start
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # escaped brace, e.g. \{1,2\}
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


def answer_is_line(text: str) -> str | None:
    """The last "... answer is X" / "Answer: X" statement, trailing period and ``$`` removed."""
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    ans = matches[-1].group(1).strip()
    ans = ans.rstrip(".").strip()
    if ans.startswith("$") and ans.endswith("$") and len(ans) >= 2:
        ans = ans.strip("$").strip()
    if ans.startswith("\\(") and ans.endswith("\\)"):
        ans = ans[2:-2].strip()
    return ans or None


def extract_answer(text: str) -> str | None:
    """The graded answer of a completion: last box, else a final "answer is" line, else None."""
    boxed = last_boxed(text)
    if boxed is not None and boxed != "":
        return boxed
    return answer_is_line(text)


# --------------------------------------------------------------- comparisons
_NUM_CLEAN_RE = re.compile(r"\\text\{[^{}]*\}|\\(?:mathrm|mbox)\{[^{}]*\}|\\[,;! ]|[$\s]")


def parse_number(s: str) -> Decimal | None:
    """A plain number from ``s`` ("1,000", "$18", "18.00", "\\$5", "50\\%"), or None.

    GSM8K answers are integers, so exact decimal comparison is the right test;
    thousands separators, currency and percent signs and ``\\text{}`` units are
    ignored.
    """
    t = s.replace("\\$", "").replace("\\%", "").replace("%", "")
    t = _NUM_CLEAN_RE.sub("", t).replace("{", "").replace("}", "")
    if "," in t:  # only as thousands separators: "1,2" is a list, not twelve
        if not re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?\.?", t):
            return None
        t = t.replace(",", "")
    t = t.rstrip(".")
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", t):
        return None
    try:
        return Decimal(t)
    except InvalidOperation:
        return None


def normalize_for_vote(ans: str) -> str:
    """A cheap canonical form used to group answers for majority voting."""
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\s+", "", ans)
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").rstrip(".")
    num = parse_number(s)
    return str(num.normalize()) if num is not None else s


def _string_equal(pred: str, gold: str) -> bool:
    return normalize_for_vote(pred) == normalize_for_vote(gold)


def math_verify_equal(pred: str, gold: str, *, timeout_s: int = 3) -> tuple[bool, bool]:
    """(``math_verify``'s verdict, whether both sides parsed into a math expression).

    math-verify keeps the raw string beside what it parses and falls back to comparing
    strings when a side yields no expression ("north pole", ``a \\& b``): such a verdict is
    returned with ``parsed = False``, so an LLM judge can overrule it. Call only in a main
    thread (its timeouts use signals).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse(f"${gold}$", extraction_config=cfg, parsing_timeout=timeout_s)
    p = parse(f"${pred}$", extraction_config=cfg, parsing_timeout=timeout_s)
    parsed = any(not isinstance(x, str) for x in g) and any(not isinstance(x, str) for x in p)
    if not g or not p:
        return False, False
    return bool(verify(g, p, timeout_seconds=timeout_s)), parsed


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one completion."""

    extracted: str | None
    correct: bool
    method: GradeMethod
    detail: str | None = None


def check_extracted(extracted: str, gold: str, kind: GraderKind, timeout_s: int = 3) -> Grade:
    """Compare an extracted answer with the gold one (runs in a worker's main thread)."""
    if kind == "numeric":
        p, g = parse_number(extracted), parse_number(gold)
        if p is not None and g is not None:
            return Grade(extracted, p == g, "numeric")
        # e.g. "\frac{36}{2}": let math-verify decide
    if _string_equal(extracted, gold):
        return Grade(extracted, True, "string")
    try:
        ok, parsed = math_verify_equal(extracted, gold, timeout_s=timeout_s)
    except Exception as e:  # math-verify or sympy blew up on a strange input
        return Grade(extracted, False, "error", f"{type(e).__name__}: {e}"[:300])
    if not parsed:
        return Grade(extracted, ok, "unparsed", "math-verify found no expression in answer or gold")
    return Grade(extracted, ok, "math_verify")


def grade_choice(completion: str, gold_letter: str, n_choices: int = 4) -> Grade:
    """simple-evals' letter check (:mod:`benchmarks.multiple_choice`): no worker needed."""
    from benchmarks.multiple_choice import extract_letter

    letter = extract_letter(completion, n_choices)
    if letter is None:
        return Grade(None, False, "no_answer")
    return Grade(letter, letter == gold_letter, "letter")


def grade_completion(
    completion: str, gold: str, kind: GraderKind = "math", timeout_s: int = 3
) -> Grade:
    """Extract and check in the current thread (must be a main thread for timeouts to work)."""
    if kind == "choice":
        return grade_choice(completion, gold)
    ext = extract_answer(completion)
    if ext is None:
        return Grade(None, False, "no_answer")
    return check_extracted(ext, gold, kind, timeout_s)


# ------------------------------------------------------------ worker process
CheckFn = Callable[[str, str, GraderKind, int], Grade]


def _worker_main(conn: Connection, check: CheckFn) -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        extracted, gold, kind, timeout_s = msg
        try:
            res: Any = check(extracted, gold, kind, timeout_s)
        except BaseException as e:  # report, never die on an input
            res = Grade(extracted, False, "error", f"{type(e).__name__}: {e}"[:300])
        try:
            conn.send(res)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, check: CheckFn) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, check), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        finally:
            self.conn.close()


class Grader:
    """Thread-safe grading through a small pool of worker processes with hard time limits.

    ``grade()`` may be called from any thread (e.g. ``loop.run_in_executor``).
    Each check runs in the main thread of a worker, so math-verify's own
    ``timeout_s`` works; on top, ``hard_timeout_s`` bounds the wall time of one
    item, after which the worker is killed and replaced.

    Workers are *spawned* (forking a process that runs threads and an event
    loop is unsafe), so, as with any ``multiprocessing`` use, a script that
    creates a Grader (or calls ``run_sweep``) needs an
    ``if __name__ == "__main__":`` guard.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        timeout_s: int = 3,
        hard_timeout_s: float = 20.0,
        check: CheckFn = check_extracted,
    ) -> None:
        self.timeout_s = timeout_s
        self.hard_timeout_s = hard_timeout_s
        self._check = check
        self._ctx = mp.get_context("spawn")  # never fork a process that runs threads
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.n_workers = max(1, workers)
        for _ in range(self.n_workers):
            self._add_worker()

    def _add_worker(self) -> None:
        w = _Worker(self._ctx, self._check)
        with self._lock:
            self._all.append(w)
        self._idle.put(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            if w in self._all:
                self._all.remove(w)
            closed = self._closed
        if not closed:
            self._add_worker()

    def check(self, extracted: str, gold: str, kind: GraderKind) -> Grade:
        """Compare an already extracted answer with gold, bounded by ``hard_timeout_s``."""
        if self._closed:
            raise RuntimeError("grader is closed")
        w = self._idle.get()
        try:
            w.conn.send((extracted, gold, kind, self.timeout_s))
            if w.conn.poll(self.hard_timeout_s):
                res = w.conn.recv()
                self._idle.put(w)
                assert isinstance(res, Grade)
                return res
            self._replace(w)
            return Grade(extracted, False, "timeout", f"no verdict within {self.hard_timeout_s}s")
        except (EOFError, OSError, BrokenPipeError) as e:
            self._replace(w)
            return Grade(extracted, False, "error", f"grading worker died ({e!r})")

    def grade(
        self, completion: str, gold: str, kind: GraderKind = "math", n_choices: int = 4
    ) -> Grade:
        """Extract the answer of ``completion`` and check it against ``gold``."""
        if kind == "choice":
            return grade_choice(completion, gold, n_choices)
        ext = extract_answer(completion)
        if ext is None:
            return Grade(None, False, "no_answer")
        return self.check(ext, gold, kind)

    def grade_many(
        self, items: Sequence[tuple[str, str, GraderKind]], *, progress: bool = False
    ) -> list[Grade]:
        """Grade ``(completion, gold, kind)`` items using all workers in parallel."""
        with ThreadPoolExecutor(self.n_workers) as ex:
            it = ex.map(lambda a: self.grade(*a), items)
            if progress:
                from tqdm import tqdm

                it = tqdm(it, total=len(items), desc="grading", unit="item")
            return list(it)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send(None)
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.kill()
            else:
                w.conn.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
