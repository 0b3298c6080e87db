"""Screening of synthetic images before they reach the classifier: ``screen`` is the stage; ``features`` (embeddings),
``metrics`` (FID, KID, k-NN precision/recall), ``memorization`` (the copy gate) and ``mask_fidelity`` its parts."""
