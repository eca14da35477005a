"""Calibrated cost profiles, one JSON file each (``NAME.json``, raw steps in
``NAME.samples.json``), written by ``slaq sim calibrate --out`` and read by
:mod:`slaq.gpu_workers.engine.profiles_store`. Data only: this package has no code."""
