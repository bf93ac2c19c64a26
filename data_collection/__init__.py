"""Stage 3: step rewards, deviation detection, reflection, D_c/D_e/D_s and nDTW weights."""
