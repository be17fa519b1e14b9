"""Shape bucketing shared by the sampler, the scorer and generation: padded lengths are rounded
up to a multiple so that jitted programs compile once per bucket, not once per length."""


def round_up(n: int, multiple: int, minimum: int = 0) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n`` and ``>= minimum``."""
    return max(minimum, ((n + multiple - 1) // multiple) * multiple)
