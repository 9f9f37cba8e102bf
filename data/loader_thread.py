"""FFCV's loader thread, made to fail loudly and to stop before the process ends.

FFCV 1.0.2's ``EpochIterator`` is a daemon thread that runs the compiled pipeline and hands batches over a
queue. Two of its habits cost whole studies:

- If the pipeline raises, the thread dies and the consumer waits in ``Queue.get()`` forever (a study that
  hung at its first batch: issue 25). Here the thread keeps its error, and ``__next__`` polls the queue: a
  dead thread raises :class:`LoaderError` in the consumer within ``POLL_S`` seconds, with the dataset's
  file and the thread's error; a batch that takes longer than ``BATCH_TIMEOUT_S`` says so and stops waiting.
- ``close()`` only sets an event that the thread reads when the queue is full, and nothing joins the thread.
  A loader abandoned mid-epoch (``break`` out of the loop) left its thread running numba's parallel loops
  when the interpreter exited, and TBB's pool, torn down under it, aborted the process (``terminate called
  without an active exception``) or crashed it (SIGSEGV after every test had passed). Here the thread checks
  the event before every batch, ``close()`` joins it, and every live iterator is closed at exit (``atexit``
  runs before the interpreter and the native libraries are torn down).
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from queue import Empty

from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.compiler import Compiler

POLL_S = 1.0  # how often a waiting consumer checks that the thread is alive
BATCH_TIMEOUT_S = 600.0  # one batch: numba's first compile is seconds, a 224 px batch of 1,024 under 10 s
JOIN_TIMEOUT_S = 30.0  # the thread finishes the batch in flight, then stops

_LIVE: weakref.WeakSet = weakref.WeakSet()  # started and not yet closed


class LoaderError(RuntimeError):
    """A loader's thread died or stopped delivering batches."""


class _Stop(Exception):
    """Raised inside the thread when ``close()`` asked it to stop."""


class GuardedEpochIterator(EpochIterator):
    """FFCV's EpochIterator whose thread reports its error, stops between batches, and is joined on close."""

    def __init__(self, loader: Loader, order) -> None:
        self.error: BaseException | None = None
        self.fname = loader.fname
        super().__init__(loader, order)  # starts the thread
        _LIVE.add(self)

    def run(self) -> None:
        try:
            super().run()
        except _Stop:
            pass
        except BaseException as e:  # handed to the consumer, which raises it
            self.error = e

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self.terminate_event.is_set():
            raise _Stop
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    def __next__(self):
        waited = 0.0
        while True:
            try:
                item = self.output_queue.get(timeout=POLL_S)
                break
            except Empty:
                waited += POLL_S
                if not self.is_alive():
                    self.close()
                    why = f"{type(self.error).__name__}: {self.error}" if self.error else "it ended without a batch"
                    raise LoaderError(f"the loader thread of {self.fname} died: {why}") from self.error
                if waited >= BATCH_TIMEOUT_S:
                    self.close()
                    raise LoaderError(f"waited {waited:.0f} s for a batch of {self.fname} from its loader thread, "
                                      "which is alive but delivered none") from None
        if item is None:
            self.close()
            raise StopIteration
        slot, result = item
        if IS_CUDA:
            self.current_stream.wait_stream(self.cuda_streams[slot])  # FFCV's: the batch's copy is done
        return result

    def close(self) -> None:
        """Stop the thread after its batch in flight and join it, then release FFCV's epoch memory."""
        self.terminate_event.set()
        _LIVE.discard(self)
        if threading.current_thread() is not self:
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while self.is_alive() and time.monotonic() < deadline:
                self._drain()  # a thread blocked putting a batch (or the end marker) into a full queue
                self.join(0.05)
            if self.is_alive():
                raise LoaderError(f"the loader thread of {self.fname} did not stop within {JOIN_TIMEOUT_S:.0f} s")
        super().close()

    def _drain(self) -> None:
        try:
            while True:
                self.output_queue.get_nowait()
        except Empty:
            pass


class GuardedLoader(Loader):
    """ffcv.loader.Loader whose epochs are GuardedEpochIterators (``__iter__`` is FFCV 1.0.2's otherwise).

    ``skip_batches`` (set before ``iter``, used by that epoch only): start the epoch after its first that many
    batches, the same batches as in a whole epoch (a run resumed from a checkpoint taken mid-epoch).
    """

    skip_batches = 0

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        epoch = self.next_epoch
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        skip, self.skip_batches = self.skip_batches * self.batch_size, 0
        return self.epoch_iterator(order[:len(self) * self.batch_size][skip:], epoch)

    def epoch_iterator(self, order, epoch: int) -> GuardedEpochIterator:
        return GuardedEpochIterator(self, order)


@atexit.register
def close_all() -> None:
    """Stop and join every loader thread still running (an epoch left mid-way) before the process exits."""
    for it in list(_LIVE):
        it.close()
