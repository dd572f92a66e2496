"""Finding and framing faces: detectors (RetinaFace, Haar), landmarks, and the crops and chips each backbone reads."""
