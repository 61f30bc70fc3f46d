"""The bundled demo corpora: real scikit-learn digits (pixel DDPMs) and scikit-image photo crops
(text-to-image pipelines), with captions, audit-group metadata and planted secrets."""
