"""Sound as pictures: mel-spectrogram presets, sound <-> picture conversion and resampling, in torch alone."""
