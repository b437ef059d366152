"""personavec: persona vectors for Hugging Face chat models.

Data flows one way: model -> activations -> vectors -> uses.
"""

__version__ = "0.1.0"
