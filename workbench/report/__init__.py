from workbench.report.build import (
    FORMATS,
    SCHEMA_VERSION,
    PdfUnavailableError,
    Report,
    Section,
    StaticImageUnavailableError,
    build_report,
    html_to_pdf,
)

__all__ = ["FORMATS", "SCHEMA_VERSION", "PdfUnavailableError", "Report", "Section", "StaticImageUnavailableError", "build_report", "html_to_pdf"]
