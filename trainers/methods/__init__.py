"""The training methods: what each trains, on top of the shared loop."""
