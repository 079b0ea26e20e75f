"""A worker process for :func:`mpcompile.numerics.permutation.search_permutations`.

Reads one pickled list of ``(key, scores, time_budget_s, seed, max_iterations)`` jobs on stdin and writes one
pickled ``(key, PermutationResult)`` per job to stdout as each search ends. A plain module run
with ``python -m`` rather than multiprocessing: spawn would re-run the caller's ``__main__``
(the ``mpcompile`` CLI itself, or a user's unguarded script), and fork would copy a process
that holds ONNX Runtime's and BLAS's threads.
"""

from __future__ import annotations

import pickle
import sys


def main() -> int:
    from threadpoolctl import threadpool_limits

    from mpcompile.numerics.permutation import search_permutation

    threadpool_limits(1)
    jobs = pickle.load(sys.stdin.buffer)
    for key, scores, time_budget_s, seed, max_iterations in jobs:
        result = search_permutation(scores, time_budget_s=time_budget_s, seed=seed, max_iterations=max_iterations)
        pickle.dump((key, result), sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
