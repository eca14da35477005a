"""The simulator: a discrete-event run of the real policy, scheduler and block manager over
public traces in virtual time, with step times from the cost model.

``run_simulation(SimConfig) -> SimResult`` (:mod:`slaq.sim.simulator`), ``compare`` of
policies (:mod:`slaq.sim.compare`), tables and plots (:mod:`slaq.sim.report`), and the
``slaq sim`` commands (:mod:`slaq.sim.cli`).
"""
