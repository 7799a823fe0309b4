"""linalign_jax: linear alignment between independently trained language models, and HELIX encrypted inference.

Stages, each a subpackage, data flowing one way:
assets -> data -> models -> features -> align -> evaluate / similarity / generate -> helix -> serve.
Importing this package is cheap: every stage is imported on demand.
"""

__version__ = "0.1.0"
