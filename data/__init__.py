"""data package: converters to tar shards (``python -m data.prepare``), ``python -m data.verify``, and the
streaming pipeline (``data.stream.TrainStream`` / ``EvalStream``). See docs/data.md."""
from .errors import DataError

__all__ = ["DataError"]
