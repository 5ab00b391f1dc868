"""Experiments over trained sets: recipe sweeps (``sweep``), the parameters-vs-score report
(``report``) and the speed/memory benchmark (``bench``)."""
