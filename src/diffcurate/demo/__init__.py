"""The bundled demo corpus: real scikit-learn digits with captions and audit-group metadata."""
