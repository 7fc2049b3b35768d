"""clinicloop: serve a medical chat model behind an OpenAI-compatible API and improve it from its
own traffic. See DESIGN.md for the whole system; each subpackage's docstring says what it owns."""

__version__ = "0.1.0"
