"""The key map's lock prefers writers: once a session waits to open or close, new evaluations queue behind it, so a
stream of evaluations cannot starve it (the review found reader-preferring locks let writers starve)."""
import threading

import pytest

pytest.importorskip("openfhe")

from linalign_jax.helix.keys import WriterPreferringLock  # noqa: E402


def test_waiting_writer_goes_before_new_readers():
    lock, order = WriterPreferringLock(), []
    first_reader_in, release_first = threading.Event(), threading.Event()

    def reader(name, entered=None, hold=None):
        with lock.shared():
            order.append(name)
            if entered:
                entered.set()
            if hold:
                hold.wait(10)

    def writer():
        with lock.exclusive():
            order.append("writer")

    threads = [threading.Thread(target=reader, args=("reader1", first_reader_in, release_first))]
    threads[0].start()
    first_reader_in.wait(10)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    while not lock._writers_waiting:  # the writer is queued behind reader1
        threading.Event().wait(0.001)
    second_reader_in = threading.Event()
    threads.append(threading.Thread(target=reader, args=("reader2", second_reader_in)))
    threads[2].start()
    # a reader-preferring lock would let reader2 in at once, beside reader1
    assert not second_reader_in.wait(0.3)
    release_first.set()
    for t in threads:
        t.join(10)
    assert order == ["reader1", "writer", "reader2"]
