"""Model code: the edit head and the editing transformer. Plain torch and diffusers modules, no I/O."""
