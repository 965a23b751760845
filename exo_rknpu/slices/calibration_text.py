"""The project's texts for w8a8 calibration and for accuracy measurement (kept apart: never mixed)."""

# Calibration text (never used to measure accuracy). Plain prose on mixed topics.
CALIBRATION_TEXT = (
    "The river had been rising for three days when the village council finally met in the old school hall. "
    "Maria, who kept the records, read out the figures: the water was two metres above its usual level, and "
    "the forecast promised more rain from the mountains. Some farmers wanted to open the sluice gates at once; "
    "others feared that the lower fields, already planted with barley, would be ruined. In the end they agreed "
    "to move the animals to higher ground and to watch the bridge through the night.\n\n"
    "A compiler translates a program written in one language into another, usually lower-level, language. "
    "Modern compilers work in stages: the front end parses the source text and checks its types, the middle "
    "end rewrites an intermediate representation to make it faster, and the back end chooses machine "
    "instructions and assigns registers. Each stage can be tested on its own, which is why large compilers "
    "remain maintainable despite their size.\n\n"
    "To bake a simple loaf, mix 500 grams of flour with 10 grams of salt, 7 grams of dried yeast and 350 "
    "millilitres of warm water. Knead the dough for ten minutes, let it rise for an hour, shape it, and bake it "
    "at 220 degrees Celsius for about 35 minutes, until the crust is brown and the loaf sounds hollow. "
    "Questions people often ask: Why did the bread not rise? Was the water too hot? How long should it rest?"
)

# Held-out text for end-to-end agreement measurements (never used for calibration).
HELDOUT_TEXT = (
    "The lighthouse keeper wrote in his log every evening, even when nothing had happened. On the fourth of "
    "November he noted a ship far to the west, a strong wind from the south, and a flock of geese flying low "
    "over the water. His daughter, who was learning to read, liked to copy the entries into her own notebook, "
    "changing the words she did not understand into drawings of boats and birds.\n\n"
    "Photosynthesis is the process by which plants, algae and some bacteria turn light into chemical energy. "
    "Chlorophyll absorbs mostly blue and red light and reflects green, which is why leaves look green to us. "
    "The light reactions split water and release oxygen; the Calvin cycle then uses the energy stored in ATP "
    "and NADPH to fix carbon dioxide into sugars that the plant uses to grow.\n\n"
    "When you plan a trip by train across Europe, check whether you need seat reservations, because many "
    "high-speed and night trains require them even with a rail pass. Travel light, keep a paper copy of your "
    "tickets, and leave at least an hour between connections at large stations. A good map and a little "
    "patience make most problems easy to solve, and the views from the window are usually worth the delays."
)
