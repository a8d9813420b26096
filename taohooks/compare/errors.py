"""The one error class of ``taocache compare``'s own findings during a run."""


class CompareError(ValueError):
    """What compare found wrong in what the script's generation returned, or in a run it stored: said in one
    line under ``taocache compare:``; an error of the script itself keeps its traceback."""
