"""Mixed-integer programs through PuLP: HiGHS (highspy, warm-started) first, CBC as fallback, with
a status that says how the answer came about.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import highspy
import numpy as np
import pulp

MIP_GAP = 0.01  # relative gap at which a packing ILP may stop (MoETuner used 0.025 with Gurobi)
STATUS_ORDER = ("optimal", "feasible", "time_limit", "fallback")  # better to worse


@dataclass(frozen=True)
class MilpResult:
    """What a solver made of one problem.

    status: ``optimal`` (proved), ``feasible`` (stopped within the gap tolerance), ``time_limit``
    (stopped by the clock with an incumbent) or ``fallback`` (no usable answer: keep the warm start).
    lower_bound: the solver's dual bound (None where the solver does not report one).
    """

    status: str
    objective: float | None
    lower_bound: float | None
    solver: str


class WarmStartedHiGHS(pulp.HiGHS):
    """PuLP's highspy interface, handing the variables' initial values to HiGHS as a MIP start
    (PuLP's own ``warmStart`` exists for HiGHS_CMD only)."""

    def callSolver(self, lp: pulp.LpProblem) -> None:
        start = [(var.index, var.varValue) for var in lp.variables() if var.varValue is not None]
        if start:
            index, value = zip(*start)
            lp.solverModel.setSolution(
                len(index), np.asarray(index, dtype=np.int32), np.asarray(value, dtype=np.float64)
            )
        lp.solverModel.run()


def solve_milp(
    problem: pulp.LpProblem, time_limit_s: float, gap_rel: float = MIP_GAP
) -> MilpResult:
    """Solve ``problem`` (variables' initial values are the warm start) with HiGHS on one thread,
    then CBC if HiGHS fails. Never raises: a failure of both is ``fallback``."""
    time_limit_s = max(time_limit_s, 0.01)
    try:
        problem.solve(
            WarmStartedHiGHS(msg=False, timeLimit=time_limit_s, threads=1, gapRel=gap_rel)
        )
        highs = problem.solverModel
        info = highs.getInfo()
        if info.primal_solution_status == 2:  # HiGHS holds a feasible integer solution
            status = highs.getModelStatus()
            if status == highspy.HighsModelStatus.kOptimal:
                label = "optimal" if info.mip_gap <= 1e-9 else "feasible"
            elif status == highspy.HighsModelStatus.kTimeLimit:
                label = "time_limit"
            else:
                label = "feasible"
            return MilpResult(label, info.objective_function_value, info.mip_dual_bound, "highs")
    except Exception:  # noqa: BLE001 - any solver trouble means: try the next solver
        pass
    try:
        with warnings.catch_warnings():  # PuLP 3.3 marks its bundled CBC deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            cbc = pulp.PULP_CBC_CMD(
                msg=False,
                timeLimit=max(time_limit_s, 1.0),
                threads=1,
                gapRel=gap_rel,
                warmStart=True,
            )
        problem.solve(cbc)
        if problem.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            label = "feasible" if problem.sol_status == pulp.LpSolutionOptimal else "time_limit"
            return MilpResult(label, pulp.value(problem.objective), None, "cbc")
    except Exception:  # noqa: BLE001
        pass
    return MilpResult("fallback", None, None, "none")


def worst_status(statuses: list[str]) -> str:
    """The worst of several statuses (``optimal`` < ``feasible`` < ``time_limit`` < ``fallback``)."""
    return max(statuses, key=STATUS_ORDER.index) if statuses else "optimal"
