"""Parallelism across ranks that the models cannot express alone: context parallelism
(``context_parallel.py``: one sequence split over a group of ranks; ``tally.py``: counting the
bytes it exchanges)."""
