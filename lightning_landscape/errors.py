"""Exceptions raised by the measurements."""


class NonFiniteError(ArithmeticError):
    """A loss, gradient or Hessian-vector product was NaN or infinite.

    Raised by every measurement so that callers (our callbacks included) can catch this
    one type, skip the measurement and let training go on.
    """
