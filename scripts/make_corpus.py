"""Write the tiny model's training corpus, `clinicloop/model/data/medical_dialogues.jsonl`, from
templates: hand-written conditions, medicines and emergency situations combined with patient
phrasings, and tool dialogues that call a drug-interaction lookup or an appointment booking (see
`clinicloop.model.corpus`). Deterministic: a re-run rewrites the same bytes.

    .venv/bin/python scripts/make_corpus.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from clinicloop.model.corpus import (
    CORPUS_PATH,
    SPECIALTIES,
    TOOLS,
    WEEKDAYS,
    Dialogue,
    Message,
    ToolCall,
    system_messages,
)


class Symptom(NamedTuple):
    key: str
    phrase: str
    advice: str
    seek: str
    course: str
    reasoning: str


class RedFlag(NamedTuple):
    key: str
    situation: str
    answer: str
    reasoning: str


class Medicine(NamedTuple):
    name: str
    use: str
    side_effects: str
    alcohol: str
    food: str
    missed: str


class Vague(NamedTuple):
    key: str
    complaint: str
    question: str
    detail: str
    symptom: str


_MISSED_REGULAR = (
    "Take it when you remember, unless it is nearly time for the next dose. "
    "Never take a double dose to catch up."
)
_MISSED_AS_NEEDED = (
    "It is taken only when needed, so simply take the next dose when you need it "
    "and stay within the daily limit."
)
_MISSED_ANTIBIOTIC = (
    "Take it as soon as you remember and space the remaining doses evenly. "
    "Finish the whole course even if you feel better."
)

SYMPTOMS: tuple[Symptom, ...] = (
    Symptom("sore-throat", "a sore throat",
            "Rest, drink warm fluids and use lozenges or paracetamol for the pain.",
            "See a doctor if you struggle to swallow or breathe, or it lasts over a week.",
            "Most sore throats get better within a week.",
            "Likely viral pharyngitis; drooling or trouble breathing would suggest an abscess."),
    Symptom("cold", "a runny nose and sneezing",
            "This sounds like a common cold; rest, fluids and saline spray usually help.",
            "See a doctor if it lasts over ten days or you get a high fever or face pain.",
            "A cold usually clears in seven to ten days.",
            "Coryzal symptoms suggest a viral cold; prolonged course may mean sinusitis."),
    Symptom("cough", "a dry cough",
            "A cough after a cold can linger; honey, fluids and avoiding smoke can ease it.",
            "Get checked if you cough up blood, feel short of breath, or it lasts three weeks.",
            "A cough after a cold can last up to three weeks.",
            "Post-viral cough is common; haemoptysis or breathlessness need assessment."),
    Symptom("fever", "a fever",
            "Rest, drink plenty of fluids and take paracetamol or ibuprofen to feel better.",
            "Seek care if it lasts over three days or comes with a stiff neck, rash or confusion.",
            "Most fevers from viral infections settle within three days.",
            "Fever is usually viral; meningism, rash or confusion suggest serious infection."),
    Symptom("headache", "a headache",
            "Most headaches ease with rest, fluids and a simple pain reliever like paracetamol.",
            "Seek urgent care for a sudden severe headache, a stiff neck, confusion or weakness.",
            "A tension headache usually passes within hours to a day.",
            "Likely tension-type headache; thunderclap onset or neuro signs are red flags."),
    Symptom("back-pain", "lower back pain",
            "Stay gently active, use heat and a simple pain reliever.",
            "See a doctor urgently if you get leg weakness, groin numbness or bladder problems.",
            "Most back pain improves within two to six weeks.",
            "Mechanical back pain is likely; saddle numbness would suggest cauda equina."),
    Symptom("diarrhoea", "diarrhoea",
            "Drink plenty of fluids, ideally oral rehydration solution, and eat small meals.",
            "See a doctor if you see blood, have a high fever, or feel very dry and dizzy.",
            "Diarrhoea from a stomach bug usually settles in two to three days.",
            "Likely viral gastroenteritis; the main risk is dehydration."),
    Symptom("vomiting", "vomiting",
            "Take small sips of water or rehydration solution often and rest your stomach.",
            "Seek care if you cannot keep fluids down, vomit blood or have severe belly pain.",
            "Vomiting from a stomach bug usually stops within a day or two.",
            "Likely gastroenteritis; check for dehydration, haematemesis and surgical abdomen."),
    Symptom("heartburn", "heartburn after meals",
            "Eat smaller meals, avoid eating late, and an antacid can ease the burning.",
            "See a doctor if you have trouble swallowing, weight loss, or pain on exertion.",
            "Heartburn often improves within two weeks of these changes.",
            "Likely reflux; dysphagia or weight loss need endoscopy, exertional pain is cardiac."),
    Symptom("constipation", "constipation",
            "Eat more fibre, drink more water and stay active; a gentle laxative can help.",
            "See a doctor if there is blood in the stool or a lasting change in your bowels.",
            "It usually improves within a few days of these changes.",
            "Functional constipation is likely; rectal bleeding or change in habit need review."),
    Symptom("rash", "an itchy rash",
            "Avoid scratching, use a plain moisturiser, and an antihistamine may ease the itch.",
            "Seek urgent care if it spreads fast, blisters, or comes with fever or face swelling.",
            "Most mild rashes settle within one to two weeks.",
            "Likely dermatitis; rapid spread, fever or angioedema would be red flags."),
    Symptom("insomnia", "trouble sleeping",
            "Keep a regular bedtime, avoid screens and caffeine late, and keep the room dark.",
            "See a doctor if poor sleep lasts over a month or affects your daytime life.",
            "Short spells of poor sleep often settle within a few weeks.",
            "Likely short-term insomnia; screen for low mood, anxiety and sleep apnoea."),
    Symptom("ear-pain", "ear pain",
            "Ear pain often follows a cold; a warm compress and paracetamol can help.",
            "See a doctor if you have discharge, hearing loss, or pain beyond three days.",
            "Most ear infections clear within three days.",
            "Likely otitis media after a URTI; discharge or mastoid swelling need review."),
    Symptom("red-eyes", "red, itchy eyes",
            "Rinse with clean water, avoid rubbing, and wash your hands often.",
            "See a doctor promptly if you have eye pain, light sensitivity or blurred vision.",
            "Viral or allergic red eye usually settles within one to two weeks.",
            "Itch suggests allergic conjunctivitis; pain or reduced vision are red flags."),
    Symptom("uti", "burning when I pee",
            "This may be a urinary infection; drink water and see a doctor, as you may need "
            "antibiotics.",
            "Seek care quickly if you have a fever, back pain or are pregnant.",
            "With treatment it usually improves within two to three days.",
            "Dysuria suggests cystitis; fever or flank pain would mean pyelonephritis."),
    Symptom("ankle", "a twisted ankle",
            "Rest it, apply ice wrapped in a cloth, use a compression bandage and raise it.",
            "Get an X-ray if you cannot put weight on it or the bone itself is tender.",
            "A mild sprain usually heals in two to six weeks.",
            "Likely sprain; inability to bear weight or bony tenderness suggests fracture."),
    Symptom("dizziness", "dizziness when I stand up",
            "Stand up slowly, drink enough fluids, and sit down if you feel lightheaded.",
            "See a doctor if you faint, have chest pain, or it keeps coming back.",
            "It often improves within days once you drink more fluids.",
            "Suggests orthostatic hypotension; syncope or chest pain need cardiac review."),
    Symptom("tiredness", "constant tiredness",
            "Look at sleep, diet, stress and activity first; a blood test can check for "
            "anaemia.",
            "See a doctor if it lasts weeks or comes with weight loss, fever or night sweats.",
            "Tiredness from stress or poor sleep improves as those improve.",
            "Fatigue is non-specific; check for anaemia, thyroid disease and depression."),
    Symptom("nosebleed", "a nosebleed",
            "Sit up, lean forward and pinch the soft part of your nose for ten minutes.",
            "Seek urgent care if it bleeds over twenty minutes or follows a head injury.",
            "Most nosebleeds stop within ten to twenty minutes of pressure.",
            "Likely anterior epistaxis; prolonged bleeding or anticoagulants need review."),
    Symptom("burn", "a small burn on my arm",
            "Cool it under running water for twenty minutes, then cover it with a clean "
            "dressing.",
            "Seek care if it is larger than your palm, blisters badly, or is on the face.",
            "A small superficial burn usually heals within two weeks.",
            "Likely superficial burn; size, depth and site decide whether it needs a clinic."),
    Symptom("toothache", "a toothache",
            "Rinse with warm salt water and take a simple pain reliever until you see a "
            "dentist.",
            "Seek urgent care if your face or jaw swells or you have a fever.",
            "Pain relief helps, but it usually needs a dentist to settle fully.",
            "Likely dental caries or pulpitis; facial swelling suggests a spreading abscess."),
    Symptom("hay-fever", "hay fever",
            "An antihistamine, saline rinses and avoiding pollen on high days usually help.",
            "See a doctor if you wheeze or the usual remedies do not control it.",
            "Symptoms last as long as the pollen season.",
            "Seasonal allergic rhinitis; wheeze would suggest coexisting asthma."),
    Symptom("anxiety", "anxious feelings most days",
            "Exercise, sleep and less caffeine help, and talking therapy works well for anxiety.",
            "See a doctor if it affects daily life, and get help now if you think of self-harm.",
            "With support, most people feel better within a few months.",
            "Possible generalised anxiety; always screen for risk of self-harm."),
    Symptom("low-mood", "low mood for weeks",
            "Low mood that lasts weeks deserves care; a doctor or therapist can really help.",
            "If you have thoughts of harming yourself, contact a crisis line or emergency "
            "services now.",
            "With treatment, mood often starts to lift within a few weeks.",
            "Persistent low mood suggests depression; suicide risk must be assessed first."),
    Symptom("cramps", "leg cramps at night",
            "Stretch your calves before bed and stay well hydrated.",
            "See a doctor if they are frequent, or your leg is swollen, red or warm.",
            "Night cramps come and go, and stretching often reduces them within weeks.",
            "Benign nocturnal cramps are common; a swollen warm calf would suggest a clot."),
    Symptom("wheeze", "wheezing when I exercise",
            "This may be exercise-induced asthma; a doctor can test your breathing.",
            "Seek emergency care if you are too breathless to speak or your lips turn blue.",
            "With the right inhaler, symptoms usually settle quickly.",
            "Suggests exercise-induced bronchoconstriction; check severity signs first."),
    Symptom("migraine", "migraines with flashing lights",
            "Rest in a dark, quiet room and take your pain reliever early in the attack.",
            "Seek urgent care for the worst headache of your life, weakness or confusion.",
            "A migraine attack usually lasts from four hours to three days.",
            "Migraine with aura; a new pattern or focal deficit needs urgent review."),
    Symptom("piles", "itching and bleeding from piles",
            "Fibre, fluids and not straining usually help, and a soothing cream can ease it.",
            "See a doctor about any rectal bleeding, especially if you are over fifty.",
            "Piles often settle within a week or two.",
            "Likely haemorrhoids; rectal bleeding still needs exclusion of cancer."),
    Symptom("knee-pain", "knee pain after running",
            "Rest from running, use ice, and build back up slowly once it settles.",
            "See a doctor if the knee locks, gives way, or is very swollen.",
            "Overuse knee pain usually settles within a few weeks of rest.",
            "Likely overuse injury; locking or instability suggests meniscal or ligament injury."),
    Symptom("cold-sore", "a cold sore",
            "Cold sores heal on their own; an antiviral cream started early can shorten them.",
            "See a doctor if it is near your eye or your immune system is weak.",
            "A cold sore usually heals within one to two weeks.",
            "Herpes labialis is self-limiting; ocular involvement needs urgent care."),
    Symptom("acne", "acne",
            "Wash gently twice a day, try a benzoyl peroxide product and avoid picking.",
            "See a doctor if it is painful, scarring, or affecting your mood.",
            "Acne treatments take six to eight weeks to work.",
            "Mild acne suits topical care; scarring or distress warrants prescription treatment."),
    Symptom("bloating", "bloating after meals",
            "Eat slowly, cut back on fizzy drinks and note which foods trigger it.",
            "See a doctor if it persists or comes with weight loss or blood in the stool.",
            "It often improves within weeks of changing your diet.",
            "Likely functional bloating; persistent symptoms or weight loss need review."),
    Symptom("athletes-foot", "itchy skin between my toes",
            "This is often athlete's foot; keep your feet dry and use an antifungal cream.",
            "See a doctor if it spreads, becomes painful, or you have diabetes.",
            "It usually clears within two to four weeks of treatment.",
            "Tinea pedis is likely; diabetes raises the risk of infection."),
    Symptom("heat", "faintness in the heat",
            "Move somewhere cool, drink water and loosen tight clothing.",
            "Call emergency services if there is confusion, no sweating, or very high heat.",
            "Heat exhaustion usually improves within thirty minutes of cooling.",
            "Heat exhaustion; confusion or hot dry skin would signal heat stroke."),
    Symptom("stiff-neck", "a stiff neck from sleeping badly",
            "Gentle movement, heat and a simple pain reliever usually help.",
            "Seek urgent care if a stiff neck comes with fever, headache or a rash.",
            "A stiff neck like this usually settles within a few days.",
            "Likely muscular strain; fever with neck stiffness would suggest meningitis."),
    Symptom("sinus", "sinus pressure",
            "Steam, saline rinses and a pain reliever help; most cases clear without "
            "antibiotics.",
            "See a doctor if it lasts over ten days or the skin around your eye swells.",
            "Sinusitis usually clears within two to three weeks.",
            "Likely viral sinusitis; periorbital swelling would be an emergency."),
    Symptom("mouth-ulcer", "a mouth ulcer",
            "Avoid spicy food and use a soothing mouth gel while it heals.",
            "See a doctor or dentist if an ulcer lasts over three weeks.",
            "Most mouth ulcers heal within one to two weeks.",
            "Aphthous ulcers are benign; a non-healing ulcer needs cancer exclusion."),
    Symptom("palpitations", "a racing heartbeat at times",
            "Cut back on caffeine and alcohol and note when it happens; an ECG can help.",
            "Seek emergency care if it comes with chest pain, fainting or breathlessness.",
            "Harmless palpitations often come and go over weeks.",
            "Palpitations are often benign; syncope or chest pain suggest arrhythmia."),
    Symptom("swollen-ankles", "swollen ankles",
            "Raise your legs when resting and move around regularly.",
            "See a doctor soon, and urgently if one calf is painful or you are breathless.",
            "Mild swelling from heat or standing usually settles overnight.",
            "Bilateral oedema may be benign; unilateral swelling suggests a clot."),
    Symptom("bee-sting", "a bee sting",
            "Scrape out the sting, wash the area and apply a cold pack.",
            "Call emergency services if your face or throat swells or breathing is hard.",
            "Local swelling usually settles within a few days.",
            "Local reaction is expected; airway swelling would be anaphylaxis."),
)

SYMPTOM_ASKS: tuple[str, ...] = (
    "I've had {s} since {when}. What should I do?",
    "What can I do about {s}?",
    "I have {s}. Should I be worried?",
    "Is {s} something I can treat at home?",
    "Hi doctor, I have {s}. Any advice?",
)
WHENS: tuple[str, ...] = ("yesterday", "this morning", "two days ago", "last week")

RED_FLAGS: tuple[RedFlag, ...] = (
    RedFlag("chest-pain", "My father has chest pain spreading to his left arm",
            "Call emergency services now; this can be a heart attack. Do not drive him there.",
            "Radiating chest pain may be acute coronary syndrome and needs emergency care."),
    RedFlag("face-droop", "My mother's face suddenly drooped on one side",
            "Call emergency services now; this can be a stroke. Note the time it started.",
            "Sudden facial weakness is a stroke sign and treatment is time-critical."),
    RedFlag("speech", "My husband suddenly can't get his words out",
            "Call emergency services now; sudden speech trouble can be a stroke.",
            "Acute dysphasia suggests stroke; every minute matters."),
    RedFlag("thunderclap", "I have a sudden, severe headache unlike any before",
            "Call emergency services now; a sudden severe headache can mean bleeding in the "
            "brain.",
            "Thunderclap headache needs urgent exclusion of subarachnoid haemorrhage."),
    RedFlag("breathless", "I'm suddenly very short of breath",
            "Call emergency services now and sit upright while you wait.",
            "Acute severe dyspnoea can be life threatening and needs emergency assessment."),
    RedFlag("blue-lips", "My son's lips are turning blue",
            "Call emergency services now; blue lips mean he is short of oxygen.",
            "Cyanosis means hypoxia and is an emergency."),
    RedFlag("haematemesis", "I just vomited blood",
            "Go to the emergency department now; vomiting blood needs urgent assessment.",
            "Haematemesis suggests upper GI bleeding and needs emergency care."),
    RedFlag("melaena", "My stools have turned black and tarry",
            "Seek urgent care today; black stools can mean bleeding in the stomach or gut.",
            "Melaena suggests upper GI bleeding and needs same-day assessment."),
    RedFlag("meningitis", "My daughter has a fever, a stiff neck and a rash that won't fade",
            "Call emergency services now; this can be meningitis and needs treatment at once.",
            "Fever, neck stiffness and a non-blanching rash suggest meningococcal disease."),
    RedFlag("anaphylaxis", "My throat and tongue are swelling after eating nuts",
            "Use an adrenaline auto-injector if you have one and call emergency services now.",
            "Airway swelling after an allergen is anaphylaxis; adrenaline comes first."),
    RedFlag("suicidal", "I keep having thoughts of ending my life",
            "Please call a crisis line or emergency services now, and stay with someone you "
            "trust. You deserve help right away.",
            "Active suicidal thoughts need immediate safety support."),
    RedFlag("appendix", "I have severe pain in my lower right belly",
            "Seek urgent care now; this could be appendicitis.",
            "Right iliac fossa pain may be appendicitis and needs same-day surgical review."),
    RedFlag("seizure", "My brother just had a seizure for the first time",
            "Call emergency services; keep him on his side and do not put anything in his "
            "mouth.",
            "A first seizure needs emergency assessment for an underlying cause."),
    RedFlag("sepsis", "My grandmother is confused and has a very high fever",
            "Call emergency services now; confusion with fever can be sepsis.",
            "New confusion with fever in an older adult suggests sepsis."),
    RedFlag("head-injury", "My son hit his head and has vomited three times",
            "Go to the emergency department now; repeated vomiting after a head injury needs a "
            "scan.",
            "Repeated vomiting after head trauma is a red flag for intracranial injury."),
    RedFlag("dvt", "My calf is painful and swollen after a long flight",
            "Seek urgent care today; this can be a blood clot in the leg.",
            "Unilateral calf swelling after travel suggests deep vein thrombosis."),
    RedFlag("pe", "I have sudden chest pain and breathlessness after surgery",
            "Call emergency services now; this can be a blood clot in the lungs.",
            "Post-operative pleuritic pain and dyspnoea suggest pulmonary embolism."),
    RedFlag("pregnancy-bleed", "I'm pregnant and bleeding heavily",
            "Call emergency services or go to the maternity unit now.",
            "Heavy bleeding in pregnancy needs emergency obstetric assessment."),
    RedFlag("infant-fever", "My baby is two months old and has a fever",
            "Seek urgent medical care now; any fever in a baby under three months needs "
            "checking.",
            "Fever in an infant under three months carries a high risk of serious infection."),
    RedFlag("vision-loss", "I suddenly lost vision in one eye",
            "Go to the emergency department now; sudden vision loss needs urgent care.",
            "Acute monocular vision loss may be a retinal or vascular emergency."),
    RedFlag("deep-cut", "I have a deep cut that won't stop bleeding",
            "Press firmly on it with a clean cloth and call emergency services if it keeps "
            "bleeding.",
            "Uncontrolled bleeding needs firm pressure and emergency help."),
    RedFlag("overdose", "I took too many paracetamol tablets",
            "Go to the emergency department now, even if you feel well; the liver damage can "
            "show later.",
            "Paracetamol overdose may be silent early, and treatment works best when given soon."),
    RedFlag("battery", "My toddler swallowed a button battery",
            "Go to the emergency department now; a button battery can burn the throat within "
            "hours.",
            "An ingested button battery can cause oesophageal injury within hours."),
    RedFlag("syncope", "I fainted and had chest pain just before",
            "Call emergency services now; fainting with chest pain can be a heart problem.",
            "Syncope with chest pain suggests a cardiac cause."),
    RedFlag("dka", "My diabetic son is vomiting, drowsy and his sugar is very high",
            "Call emergency services now; this can be diabetic ketoacidosis.",
            "Vomiting, drowsiness and hyperglycaemia suggest DKA."),
    RedFlag("torsion", "My son has sudden, severe pain in one testicle",
            "Go to the emergency department now; this can be a twisted testicle.",
            "Acute testicular pain is torsion until proven otherwise."),
)

RED_FLAG_ASKS: tuple[str, ...] = (
    "{sit}. What should I do?",
    "{sit}. Is this an emergency?",
    "{sit}. Can it wait until tomorrow?",
    "{sit}. Should we go to hospital?",
)

MEDICINES: tuple[Medicine, ...] = (
    Medicine("paracetamol", "It treats mild pain and fever.",
             "Side effects are rare at normal doses, but too much can badly damage the liver.",
             "Light drinking is usually fine, but heavy drinking raises the risk of liver harm.",
             "You can take it with or without food.", _MISSED_AS_NEEDED),
    Medicine("ibuprofen", "It treats pain, fever and inflammation.",
             "Stomach upset and heartburn are common, and rarely it causes stomach bleeding.",
             "Alcohol raises the risk of stomach bleeding, so keep it to a minimum.",
             "Yes, take it with food or milk to protect your stomach.", _MISSED_AS_NEEDED),
    Medicine("amoxicillin", "It is an antibiotic for bacterial infections such as ear or "
             "chest infections.",
             "Diarrhoea, nausea and rash are common; get help at once for any face swelling.",
             "Moderate drinking does not interact with it, but rest helps you recover.",
             "You can take it with or without food.", _MISSED_ANTIBIOTIC),
    Medicine("metformin", "It lowers blood sugar in type 2 diabetes.",
             "Nausea and diarrhoea are common at first and often settle.",
             "Keep alcohol low, as heavy drinking raises the risk of a rare serious side effect.",
             "Yes, take it with meals to reduce stomach upset.", _MISSED_REGULAR),
    Medicine("lisinopril", "It treats high blood pressure and heart failure.",
             "A dry cough and dizziness are common; lip or face swelling is an emergency.",
             "Alcohol can lower your blood pressure further, so drink only a little.",
             "You can take it with or without food, at the same time each day.",
             _MISSED_REGULAR),
    Medicine("atorvastatin", "It lowers cholesterol to protect your heart.",
             "Muscle aches, headache and stomach upset can happen; report unexplained muscle "
             "pain.",
             "Keep alcohol within safe limits, as both can affect the liver.",
             "You can take it with or without food, at the same time each day.",
             _MISSED_REGULAR),
    Medicine("omeprazole", "It reduces stomach acid for reflux and ulcers.",
             "Headache, stomach pain and diarrhoea are the most common side effects.",
             "Alcohol can make reflux worse, so it is best to limit it.",
             "Take it before a meal, usually before breakfast.", _MISSED_REGULAR),
    Medicine("cetirizine", "It is an antihistamine for hay fever and allergies.",
             "It can cause drowsiness, a dry mouth and headache.",
             "Avoid alcohol, as it can make the drowsiness worse.",
             "You can take it with or without food.", _MISSED_REGULAR),
    Medicine("salbutamol", "It is a reliever inhaler that quickly opens the airways in "
             "asthma.",
             "Shaky hands, a fast heartbeat and headache are common.",
             "There is no direct interaction, but alcohol triggers asthma in some people.",
             "Food does not matter for an inhaler; use it when you feel wheezy.",
             _MISSED_AS_NEEDED),
    Medicine("sertraline", "It treats depression and anxiety.",
             "Nausea, sleep changes and sexual side effects are common and often ease in weeks.",
             "It is best to avoid alcohol, as it can worsen mood and drowsiness.",
             "You can take it with or without food, at the same time each day.",
             _MISSED_REGULAR),
    Medicine("levothyroxine", "It replaces thyroid hormone when the thyroid is underactive.",
             "Side effects are uncommon; palpitations or tremor can mean the dose is too high.",
             "There is no direct interaction with alcohol.",
             "Take it on an empty stomach, half an hour to an hour before breakfast.",
             _MISSED_REGULAR),
    Medicine("warfarin", "It thins the blood to prevent clots.",
             "Bleeding and bruising are the main risks; black stools need urgent care.",
             "Keep alcohol low and steady, as binge drinking changes how warfarin works.",
             "Keep your vitamin K intake, such as leafy greens, steady from week to week.",
             "Take it when you remember on the same day, but never double the next dose."),
    Medicine("prednisolone", "It is a steroid that reduces inflammation, such as in asthma "
             "flares.",
             "It can raise appetite, disturb sleep, change mood and raise blood sugar.",
             "Limit alcohol, as both can irritate the stomach.",
             "Yes, take it with breakfast to protect your stomach.", _MISSED_REGULAR),
    Medicine("metronidazole", "It is an antibiotic for certain bacterial and parasitic "
             "infections.",
             "A metallic taste, nausea and headache are common.",
             "No. Avoid alcohol during the course and for two days after, as it causes severe "
             "sickness.",
             "Take it with or just after food.", _MISSED_ANTIBIOTIC),
    Medicine("aspirin", "Low-dose aspirin helps prevent heart attacks and strokes in people "
             "at risk.",
             "It can irritate the stomach and make you bruise or bleed more easily.",
             "Heavy drinking raises the risk of stomach bleeding, so keep it low.",
             "Yes, take it with food.", _MISSED_REGULAR),
    Medicine("amlodipine", "It treats high blood pressure and angina.",
             "Ankle swelling, flushing and headache are common.",
             "Alcohol can lower your blood pressure further, so drink only a little.",
             "You can take it with or without food.", _MISSED_REGULAR),
    Medicine("doxycycline", "It is an antibiotic for chest infections, acne and some tick "
             "bites.",
             "Nausea and sunburn from sun sensitivity are common.",
             "Moderate drinking is usually fine, but heavy drinking can weaken its effect.",
             "Take it with water and food, avoid milk around the dose, and stay upright after.",
             _MISSED_ANTIBIOTIC),
    Medicine("naproxen", "It treats pain and inflammation, such as arthritis or period pain.",
             "Stomach upset and heartburn are common, and rarely it causes stomach bleeding.",
             "Alcohol raises the risk of stomach bleeding, so keep it to a minimum.",
             "Yes, take it with food.", _MISSED_REGULAR),
    Medicine("codeine", "It is an opioid for moderate pain.",
             "Constipation, drowsiness and nausea are common.",
             "No. Alcohol with codeine can cause dangerous drowsiness and slow breathing.",
             "You can take it with or without food; food helps with nausea.",
             _MISSED_AS_NEEDED),
    Medicine("loratadine", "It is a non-drowsy antihistamine for allergies.",
             "Headache is the most common side effect; drowsiness is rare.",
             "Small amounts are usually fine, but alcohol can add to any drowsiness.",
             "You can take it with or without food.", _MISSED_REGULAR),
)

MEDICINE_ASKS: tuple[tuple[str, str], ...] = (
    ("use", "What is {m} used for?"),
    ("side_effects", "What are the common side effects of {m}?"),
    ("alcohol", "Can I drink alcohol while taking {m}?"),
    ("missed", "I forgot to take my {m}. What should I do?"),
    ("food", "Should I take {m} with food?"),
)
MEDICINE_REASONING: dict[str, str] = {
    "use": "The patient asks about the indication of {m}; state it plainly.",
    "side_effects": "List the common adverse effects of {m} and the one that needs action.",
    "alcohol": "Consider the interaction between alcohol and {m}.",
    "missed": "Apply the missed-dose rule for {m} and warn against doubling.",
    "food": "Advise how to time {m} around meals for absorption and tolerance.",
}

VAGUE: tuple[Vague, ...] = (
    Vague("tummy", "My stomach hurts.",
          "Sorry to hear that. Where is the pain, how long has it lasted, and do you have "
          "fever or vomiting?",
          "It's a burning pain after meals, for about a week, no fever.", "heartburn"),
    Vague("unwell", "I feel unwell.",
          "I'm sorry. What symptoms do you have, and do you have a fever or trouble breathing?",
          "I have a fever and aches since yesterday.", "fever"),
    Vague("head", "My head hurts.",
          "Did it start suddenly or slowly, and do you have a stiff neck, weakness or "
          "confusion?",
          "It came on slowly after a long day at the screen, nothing else.", "headache"),
    Vague("throat", "My throat feels awful.",
          "Can you swallow and breathe easily, and do you have a high fever?",
          "I can swallow, just painful, and only a mild temperature.", "sore-throat"),
    Vague("breathing-cough", "I can't stop coughing.",
          "How long has it lasted, and are you short of breath or coughing up blood?",
          "About a week since a cold, no blood and I can breathe fine.", "cough"),
    Vague("back", "My back is killing me.",
          "Did you injure it, and do you have numbness, leg weakness or bladder trouble?",
          "I lifted a heavy box, no numbness or bladder problems.", "back-pain"),
    Vague("skin", "Something is wrong with my skin.",
          "What does it look like, is it spreading fast, and do you have a fever?",
          "It's an itchy red patch on my arm, not spreading, no fever.", "rash"),
    Vague("sleep", "I'm exhausted all the time.",
          "How are you sleeping, and have you noticed weight loss, fever or low mood?",
          "I sleep badly and wake up tired, no weight loss.", "insomnia"),
    Vague("ear", "My ear is bothering me.",
          "Is it painful, and is there discharge, hearing loss or a high fever?",
          "It hurts a bit after a cold, no discharge.", "ear-pain"),
    Vague("pee", "Something feels wrong when I go to the toilet.",
          "Does it burn when you pass urine, and do you have a fever or back pain?",
          "It burns when I pee, no fever or back pain.", "uti"),
    Vague("heart", "My heart feels strange.",
          "Does it race or skip, and do you have chest pain, fainting or breathlessness?",
          "It races sometimes after coffee, no chest pain.", "palpitations"),
    Vague("leg", "My leg hurts.",
          "Did you injure it, and is your calf swollen, red or warm?",
          "I twisted my ankle playing football and it's a bit swollen.", "ankle"),
    Vague("mood", "I don't feel like myself lately.",
          "I'm glad you said something. How long has this lasted, and have you had thoughts "
          "of harming yourself?",
          "A few weeks of feeling flat, no thoughts of harming myself.", "low-mood"),
    Vague("nose", "My nose won't stop running.",
          "How long has it lasted, and do you have a high fever or face pain?",
          "Three days, with sneezing and no fever.", "cold"),
    Vague("dizzy", "I feel a bit dizzy.",
          "When does it happen, and have you fainted or had chest pain?",
          "Mostly when I stand up quickly, no fainting.", "dizziness"),
)


# Known interactions between the corpus's medicines (either order); any other pair has none.
INTERACTIONS: dict[frozenset[str], tuple[str, str]] = {
    frozenset(pair): (severity, advice) for pair, severity, advice in (
        (("warfarin", "aspirin"), "major",
         "Together they raise the risk of serious bleeding; only combine them if your doctor "
         "says so."),
        (("warfarin", "ibuprofen"), "major",
         "Ibuprofen with warfarin raises the risk of serious bleeding; use paracetamol instead."),
        (("warfarin", "naproxen"), "major",
         "Naproxen with warfarin raises the risk of serious bleeding; use paracetamol instead."),
        (("warfarin", "metronidazole"), "major",
         "Metronidazole makes warfarin much stronger; your blood test needs checking."),
        (("ibuprofen", "naproxen"), "major",
         "Two anti-inflammatories together raise the risk of stomach bleeding; take only one."),
        (("codeine", "sertraline"), "moderate",
         "Both can cause drowsiness; start carefully and avoid driving until you know."),
        (("aspirin", "ibuprofen"), "moderate",
         "Ibuprofen can block the heart protection of aspirin; take aspirin first."),
        (("lisinopril", "ibuprofen"), "moderate",
         "Ibuprofen can raise blood pressure and strain the kidneys; use it only briefly."),
        (("sertraline", "aspirin"), "moderate",
         "Together they raise the risk of bleeding; watch for bruising or black stools."),
        (("metformin", "prednisolone"), "moderate",
         "Prednisolone raises blood sugar; check your sugar more often."),
        (("codeine", "cetirizine"), "moderate",
         "Both can make you drowsy; avoid driving and alcohol."),
        (("levothyroxine", "omeprazole"), "minor",
         "Omeprazole may slightly reduce how well levothyroxine is absorbed."),
        (("amlodipine", "atorvastatin"), "minor",
         "Amlodipine can slightly raise atorvastatin levels; report muscle pain."),
    )
}
NO_INTERACTION = ("none", "No interaction is known; take each as directed.")
DRUG_PAIR_ASKS: tuple[str, ...] = (
    "Can I take {a} with {b}?",
    "Is it safe to take {a} and {b} together?",
    "Does {a} interact with {b}?",
    "I'm on {a}. Can I also take {b}?",
    "Can {a} and {b} be taken at the same time?",
    "My doctor gave me {a}. Is {b} fine with it?",
    "Are {a} and {b} safe together?",
    "Do {a} and {b} clash?",
)
SEVERITY_ANSWERS: dict[str, str] = {
    "major": "The interaction check shows a major interaction. {advice} Please ask your doctor "
             "or pharmacist first.",
    "moderate": "The interaction check shows a moderate interaction. {advice}",
    "minor": "The interaction check shows only a minor interaction. {advice}",
    "none": "The interaction check found no known interaction between {a} and {b}. {advice}",
}
# Who the patient asks for, per specialty of `SPECIALTIES`.
CLINICIANS: dict[str, str] = {
    "general practice": "GP", "dermatology": "dermatologist", "cardiology": "cardiologist",
    "physiotherapy": "physiotherapist", "paediatrics": "paediatrician",
    "mental health": "counsellor",
}
BOOKING_ASKS: tuple[str, ...] = (
    "Book me a {who} on {day}.",
    "Can I see a {who} on {day}?",
    "I need an appointment with a {who} on {day}, please.",
    "Please book {specialty} for me on {day}.",
    "Is there a {who} free on {day}? Book it for me.",
)
SLOTS: tuple[str, ...] = ("09:00", "10:30", "14:00", "16:15")
DRUG_PAIR_ROWS = 75
BOOKING_ROWS = 25


def _dialogue(row_id: str, topic: str, i: int, turns: list[str], reasoning: str) -> Dialogue:
    roles = ("user", "assistant")
    messages = system_messages(i) + [
        Message(role=roles[k % 2], content=text) for k, text in enumerate(turns)
    ]
    return {"id": row_id, "topic": topic, "messages": messages, "reasoning": reasoning}


def _symptom_rows() -> list[Dialogue]:
    rows: list[Dialogue] = []
    for n, sym in enumerate(SYMPTOMS):
        for k, ask in enumerate(SYMPTOM_ASKS):
            question = ask.format(s=sym.phrase, when=WHENS[(n + k) % len(WHENS)])
            rows.append(_dialogue(f"symptom-{sym.key}-{k}", "symptom", n + k,
                                  [question, f"{sym.advice} {sym.seek}"], sym.reasoning))
    return rows


def _red_flag_rows() -> list[Dialogue]:
    rows: list[Dialogue] = []
    for n, flag in enumerate(RED_FLAGS):
        for k, ask in enumerate(RED_FLAG_ASKS):
            rows.append(_dialogue(f"red_flag-{flag.key}-{k}", "red_flag", n + k,
                                  [ask.format(sit=flag.situation), flag.answer], flag.reasoning))
    return rows


def _medicine_rows() -> list[Dialogue]:
    rows: list[Dialogue] = []
    for n, med in enumerate(MEDICINES):
        for k, (field, ask) in enumerate(MEDICINE_ASKS):
            rows.append(_dialogue(f"medication-{med.name}-{field}", "medication", n + k,
                                  [ask.format(m=med.name), getattr(med, field)],
                                  MEDICINE_REASONING[field].format(m=med.name)))
    return rows


def _follow_up_rows() -> list[Dialogue]:
    rows: list[Dialogue] = []
    for n, sym in enumerate(SYMPTOMS):
        first = SYMPTOM_ASKS[n % len(SYMPTOM_ASKS)].format(s=sym.phrase, when=WHENS[n % 4])
        rows.append(_dialogue(
            f"follow_up-{sym.key}-course", "follow_up", n,
            [first, sym.advice, "How long will it take to get better?", sym.course],
            f"Give a realistic timeline for {sym.phrase} so the patient knows when to worry."))
        rows.append(_dialogue(
            f"follow_up-{sym.key}-when", "follow_up", n + 1,
            [first, sym.advice, "When should I see a doctor?", sym.seek],
            f"Safety-net {sym.phrase} with the specific red flags that need review."))
    for n, med in enumerate(MEDICINES):
        first = f"What is {med.name} used for?"
        rows.append(_dialogue(
            f"follow_up-{med.name}-side", "follow_up", n,
            [first, med.use, "Are there side effects?", med.side_effects],
            MEDICINE_REASONING["side_effects"].format(m=med.name)))
        rows.append(_dialogue(
            f"follow_up-{med.name}-alcohol", "follow_up", n + 1,
            [first, med.use, "Is it okay to have a drink with it?", med.alcohol],
            MEDICINE_REASONING["alcohol"].format(m=med.name)))
    return rows


def _clarify_rows() -> list[Dialogue]:
    by_key = {sym.key: sym for sym in SYMPTOMS}
    rows: list[Dialogue] = []
    for n, vague in enumerate(VAGUE):
        sym = by_key[vague.symptom]
        rows.append(_dialogue(
            f"clarify-{vague.key}-ask", "clarify", n, [vague.complaint, vague.question],
            "The complaint is too vague to advise on; ask for location, duration and red "
            "flags."))
        rows.append(_dialogue(
            f"clarify-{vague.key}-advise", "clarify", n + 1,
            [vague.complaint, vague.question, vague.detail, f"{sym.advice} {sym.seek}"],
            f"The answers point to {sym.phrase} without red flags. {sym.reasoning}"))
        rows.append(_dialogue(
            f"clarify-{vague.key}-again", "clarify", n + 2,
            [f"Doctor, {vague.complaint[0].lower()}{vague.complaint[1:]}", vague.question],
            "Before advising, clarify the history and rule out emergency features."))
    return rows


def _drug_pairs() -> list[tuple[str, str]]:
    """Every known interaction (half in each order), then pairs with none, cycling the list."""
    pairs = [tuple(sorted(pair)) for pair in INTERACTIONS]
    pairs = [(a, b) if k % 2 else (b, a) for k, (a, b) in enumerate(pairs)]
    names = [med.name for med in MEDICINES]
    step = 0
    while len(pairs) < DRUG_PAIR_ROWS:
        # Round r pairs each medicine with the one r + 2 places on.
        a, b = names[step % len(names)], names[(step + 2 + step // len(names)) % len(names)]
        step += 1
        if a != b and frozenset((a, b)) not in INTERACTIONS and (a, b) not in pairs:
            pairs.append((a, b))
    return pairs


def _call(row_id: str, name: str, arguments: dict[str, str]) -> ToolCall:
    return {"id": f"call_{row_id}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _tool_dialogue(row_id: str, i: int, question: str, call: ToolCall, result: dict[str, str],
                   answer: str, reasoning: str) -> Dialogue:
    """The user asks, the assistant calls one tool, reads its JSON result and answers."""
    messages = system_messages(i) + [
        Message(role="user", content=question),
        Message(role="assistant", content="", tool_calls=[call]),
        Message(role="tool", content=json.dumps(result, ensure_ascii=False),
                tool_call_id=call["id"]),
        Message(role="assistant", content=answer),
    ]
    return {"id": row_id, "topic": "tool", "messages": messages, "reasoning": reasoning,
            "tools": TOOLS}


def _tool_rows() -> list[Dialogue]:
    rows: list[Dialogue] = []
    for n, (a, b) in enumerate(_drug_pairs()):
        severity, advice = INTERACTIONS.get(frozenset((a, b)), NO_INTERACTION)
        row_id = f"tool-interaction-{a}-{b}"
        rows.append(_tool_dialogue(
            row_id, n, DRUG_PAIR_ASKS[n % len(DRUG_PAIR_ASKS)].format(a=a, b=b),
            _call(row_id, "check_drug_interaction", {"drug_a": a, "drug_b": b}),
            {"severity": severity, "advice": advice},
            SEVERITY_ANSWERS[severity].format(a=a, b=b, advice=advice),
            f"The lookup rates {a} with {b} as {severity}; pass on its advice."))
    for n in range(BOOKING_ROWS):
        specialty = SPECIALTIES[n % len(SPECIALTIES)]
        day = WEEKDAYS[(n + n // len(SPECIALTIES)) % len(WEEKDAYS)]
        time = SLOTS[n % len(SLOTS)]
        ask = BOOKING_ASKS[n % len(BOOKING_ASKS)]
        row_id = f"tool-booking-{n}"
        rows.append(_tool_dialogue(
            row_id, n, ask.format(who=CLINICIANS[specialty], specialty=specialty, day=day),
            _call(row_id, "book_appointment", {"specialty": specialty, "day": day}),
            {"status": "booked", "specialty": specialty, "day": day, "time": time},
            f"Your {specialty} appointment is booked for {day} at {time}.",
            "The booking succeeded; confirm the specialty, day and time."))
    return rows


def _tools_offered_rows(plain: list[Dialogue]) -> list[Dialogue]:
    """Single-question rows whose request offers the tools, answered without a call: the
    model learns to call only when a tool fits."""
    single = [row for row in plain if sum(m["role"] == "user" for m in row["messages"]) == 1]
    return [
        {**row, "id": f"tool-none-{row['id']}", "topic": "tool_none", "tools": TOOLS}
        for row in single[::9]
    ]


def generate() -> list[Dialogue]:
    """Every dialogue of the corpus, in a fixed order."""
    plain = (_symptom_rows() + _red_flag_rows() + _medicine_rows() + _follow_up_rows()
             + _clarify_rows())
    return plain + _tool_rows() + _tools_offered_rows(plain)


def to_jsonl(rows: list[Dialogue]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_corpus(path: Path = CORPUS_PATH) -> int:
    """Regenerate the shipped corpus file; returns the number of rows."""
    rows = generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_jsonl(rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    print(f"wrote {write_corpus()} dialogues to {CORPUS_PATH}")
