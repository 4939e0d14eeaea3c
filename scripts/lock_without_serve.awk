# Split requirements/cpu.txt: by default print the lock without the llama-cpp-python entry
# (the `serve` extra, an sdist that takes ~9 min to build); with -v serve=1 print only that entry.
/^llama-cpp-python==/ { inside = 1; if (serve) print; next }
inside && /^[ \t]/    { if (serve) print; next }
                      { inside = 0; if (!serve) print }
