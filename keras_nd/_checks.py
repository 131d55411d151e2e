"""Argument checks shared across keras_nd: each returns the value or raises a ValueError that
names the argument, what it got, and what would be accepted."""

import numbers

__all__ = ["is_integer", "is_number", "integer", "number"]


def is_number(value):
  """Whether `value` is a real number (a bool is not)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value):
  """Whether `value` is an integer (a bool is not; numpy integers are)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value, name, minimum=1, context=""):
  """`value` as an int, if it is an integer of at least `minimum`.

  Args:
    value: what the caller was given.
    name: the argument's name, as the error names it.
    minimum: the least value accepted (1: "a positive integer", 0: "a
      non-negative integer").
    context: words before the message, e.g. "embedded: ".

  Raises:
    ValueError: naming `name`, the integers accepted and `value`.
  """
  if not is_integer(value) or value < minimum:
    accepted = {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum, f"an integer >= {minimum}")
    raise ValueError(f"{context}{name} must be {accepted}; got {value!r}.")
  return int(value)


def number(value, name, low=None, high=None, low_open=False, high_open=False, context=""):
  """`value` as a float, if it is a finite real number within the given bounds.

  Args:
    value: what the caller was given.
    name: the argument's name.
    low, high: bounds (None: unbounded on that side).
    low_open, high_open: whether a bound itself is excluded.
    context: words before the message.

  Raises:
    ValueError: naming `name`, the interval accepted and `value`.
  """
  ok = is_number(value) and value == value and abs(value) != float("inf")
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    interval = (f"{left}{'-inf' if low is None else f'{low:g}'}, "
                f"{'inf' if high is None else f'{high:g}'}{right}")
    raise ValueError(f"{context}{name} must be a number in {interval}; got {value!r}.")
  return float(value)
