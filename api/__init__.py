"""The only package that knows HTTP and the command line: the FastAPI app, settings, wiring
(``bootstrap``), the mapping of domain errors to RFC 9457 problem documents, and the CLI."""
