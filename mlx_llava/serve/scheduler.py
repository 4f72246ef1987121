"""The model thread: continuous batching of the server's requests.

One thread owns the model and `mlx_llava.batch.BatchGenerator` (MLX arrays
are not for several threads at once). Request handlers (asyncio) hand it
`Job`s through a queue; it loops:

1. take what arrived: check each new prompt (tokens, context) and answer
   "accepted" or an error at once; cancel what its client left;
2. let waiting jobs join the running batch while there are free slots (all
   that join in one step share one vision-tower call; each starts from the
   longest prefix the PrefixCache holds);
3. one decoding step for every running job; each token's text goes back to
   its job's asyncio queue (`loop.call_soon_threadsafe`), held back while it
   may be the start of a stop string; a finished job leaves the batch.

A job's slot is freed the step after its client goes (`cancel`). At most
`max_batch` decode at once and `max_queue` wait; `submit` refuses more
(503 with Retry-After).
"""

import asyncio
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from typing import List, Optional

import mlx.core as mx

from ..batch import BatchGenerator, PrefixCache, Request
from ..errors import LlavaError
from .protocol import APIError

log = logging.getLogger("mlx_llava.serve")


class Job:
    """One request on its way through the model thread. Events on `events`:
    ("accepted", prompt_tokens), ("text", str), ("done", (finish_reason,
    prompt_tokens, completion_tokens)), ("error", APIError), and ("gone",
    None) put there by the handler when its client disconnects."""

    def __init__(self, request: Request, stop: Optional[List[str]] = None, loop=None):
        self.request = request
        self.stop = list(stop or [])
        self.loop = loop or asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.uid = None
        self.finished = False  # set on the event loop's side when done or failed
        self.cancelled = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.pending = ""  # text held back: it may begin a stop string
        self.started = None

    def emit(self, kind: str, value=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # its event loop has closed: nobody is listening
            pass


class Scheduler:
    def __init__(self, model, processor, max_batch: int = 8, max_queue: int = 64,
                 prefix_cache_bytes: int = 1 << 30):
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.generator = None  # made in the model thread: MLX arrays live on their thread's stream
        self.inbox = queue.SimpleQueue()
        self.waiting = deque()  # accepted, not yet decoding (model thread only)
        self.running = {}  # uid -> Job (model thread only)
        self.lock = threading.Lock()
        self.active = 0  # submitted and not yet finished (under lock)
        self.closing = False
        self.seconds_per_job = 1.0  # a running average, for Retry-After
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "rejected": 0,
                      "generated_tokens": 0, "steps": 0, "batch_sizes": Counter(), "max_batch_size": 0,
                      "peak_memory_bytes": 0, "active_memory_bytes": 0}
        self.thread = threading.Thread(target=self._loop, name="mlx-llava-model", daemon=True)

    def _generator(self) -> BatchGenerator:
        return BatchGenerator(self.model, self.processor, max_batch_size=self.max_batch,
                              prefix_cache=self.prefix_cache)

    def start(self):
        self.thread.start()

    def close(self, timeout: Optional[float] = None):
        """Finish what runs and waits, then stop the thread."""
        with self.lock:
            self.closing = True
        self.inbox.put(("close", None))
        self.thread.join(timeout)

    # ---------------------------------------------------- the handlers' side

    def submit(self, job: Job):
        with self.lock:
            if self.closing:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if self.active >= self.max_batch + self.max_queue:
                self.stats["rejected"] += 1
                wait = max(1, math.ceil(self.seconds_per_job * (self.active - self.max_batch + 1) / self.max_batch))
                raise APIError(503, f"the server is busy ({self.max_batch} answering, {self.max_queue} waiting); "
                                    f"retry in {wait} s", code="server_busy", headers={"Retry-After": str(wait)})
            self.active += 1
            self.stats["requests"] += 1
        job.started = time.perf_counter()
        self.inbox.put(("submit", job))

    def cancel(self, job: Job):
        """The client went: free its slot (at the next step)."""
        if not job.finished and not job.cancelled:
            job.cancelled = True
            self.inbox.put(("cancel", job))

    def snapshot(self) -> dict:
        with self.lock:
            s = dict(self.stats, active=self.active, batch_sizes=dict(sorted(self.stats["batch_sizes"].items())))
        s["waiting"] = len(self.waiting)
        s["running"] = len(self.running)
        s["max_batch"], s["max_queue"] = self.max_batch, self.max_queue
        if self.prefix_cache is not None:
            s["prefix_cache"] = {"entries": len(self.prefix_cache), "bytes": self.prefix_cache.nbytes,
                                 "hits": self.prefix_cache.hits, "reused_tokens": self.prefix_cache.reused_tokens}
        return s

    # ------------------------------------------------------ the model thread

    def _loop(self):
        self.generator = self._generator()
        closing = False
        while True:
            idle = not self.running and not self.waiting
            if idle and closing:
                break
            closing |= self._take(block=idle)
            try:
                self._start()
                if self.running:
                    self._step()
            except Exception as e:  # never a dead server: fail these requests, start afresh
                log.exception("the model thread failed; its running requests are answered with an error")
                for job in list(self.running.values()):
                    self._fail(job, APIError(500, f"generation failed ({type(e).__name__})", code="server_error"))
                self.running.clear()
                try:
                    self.generator.close()
                except Exception:
                    pass
                self.generator = self._generator()

    def _take(self, block: bool) -> bool:
        """Everything in the inbox (waiting for the first item when idle); True once asked to close."""
        closing = False
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return False
        while item is not None:
            kind, job = item
            if kind == "close":
                closing = True
            elif kind == "submit":
                self._accept(job)
            elif kind == "cancel":
                self._cancel(job)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        return closing

    def _accept(self, job: Job):
        if job.cancelled:
            return self._release(job, "cancelled")
        try:
            job.prompt_tokens = len(self.generator.prompt_ids(job.request))
        except LlavaError as e:
            too_long = "too long for the model's context" in str(e)
            return self._fail(job, APIError(422 if too_long else 400, str(e),
                                            code="context_length_exceeded" if too_long else None))
        job.emit("accepted", job.prompt_tokens)
        self.waiting.append(job)

    def _cancel(self, job: Job):
        if job.uid is not None and job.uid in self.running:
            self.generator.remove([job.uid])
            del self.running[job.uid]
            self._release(job, "cancelled")
        elif job in self.waiting:
            self.waiting.remove(job)
            self._release(job, "cancelled")

    def _start(self):
        joining = []
        while self.waiting and len(self.running) + len(joining) < self.max_batch:
            job = self.waiting.popleft()
            if not job.cancelled:
                joining.append(job)
        if not joining:
            return
        try:
            uids = self.generator.insert([j.request for j in joining])
        except Exception:
            # One of them may be at fault: each tries alone, so only that one fails.
            uids = []
            for job in joining:
                try:
                    uids += self.generator.insert([job.request])
                except LlavaError as e:
                    self._fail(job, APIError(400, str(e)))
                    uids.append(None)
                except Exception as e:
                    log.exception("a request failed to start")
                    self._fail(job, APIError(500, f"generation failed ({type(e).__name__})", code="server_error"))
                    uids.append(None)
        for job, uid in zip(joining, uids):
            if uid is not None:
                job.uid = uid
                self.running[uid] = job

    def _step(self):
        responses = self.generator.next()
        if responses:
            with self.lock:
                self.stats["steps"] += 1
                self.stats["batch_sizes"][len(responses)] += 1
                self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(responses))
                self.stats["generated_tokens"] += len(responses)
        for r in responses:
            job = self.running.get(r.uid)
            if job is None:
                continue
            job.completion_tokens = r.generation_tokens
            text, hit = self._text(job, r.text)
            if text:
                job.emit("text", text)
            if hit or r.finish_reason is not None:
                if r.finish_reason is None:  # a stop string: it leaves the batch now
                    self.generator.remove([r.uid])
                elif job.pending:
                    job.emit("text", job.pending)
                del self.running[r.uid]
                job.emit("done", ("stop" if hit else r.finish_reason, job.prompt_tokens, job.completion_tokens))
                self._release(job, "completed")
        self.stats["peak_memory_bytes"] = mx.get_peak_memory()
        self.stats["active_memory_bytes"] = mx.get_active_memory()

    @staticmethod
    def _text(job: Job, new: str) -> tuple:
        """(text to send now, whether a stop string was reached): the stop string
        and what follows it are never sent; a tail that may begin one waits."""
        if not job.stop:
            return new, False
        text = job.pending + new
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if hits:
            job.pending = ""
            return text[: min(hits)], True
        hold = max((k for s in job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        job.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def _fail(self, job: Job, error: APIError):
        job.emit("error", error)
        self._release(job, "failed")

    def _release(self, job: Job, outcome: str):
        with self.lock:
            self.active -= 1
            self.stats[outcome] += 1
            if outcome == "completed" and job.started is not None:
                self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.perf_counter() - job.started)
