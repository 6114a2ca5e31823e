"""The failure generators under the names the tests have always used (`tests.generators:generate`,
`tests.generators:fanout`); they live in devtools/generators.py, where the README documents them."""

from devtools.generators import SECRET, Fanout, fanout, generate

__all__ = ["SECRET", "Fanout", "fanout", "generate"]
