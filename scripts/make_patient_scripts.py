"""Write the patient scripts the project ships, `clinicloop/verifier/data/patient_scripts.jsonl`
(read by `clinicloop.verifier.patients`). Deterministic: a re-run rewrites the same bytes.

    .venv/bin/python scripts/make_patient_scripts.py

Every case is invented (no real patient data). Cases span the specialties of a general practice,
eleven are red flags whose right plan is emergency care, and each has two hidden findings of the
kinds a doctor should ask about (smoking, alcohol, travel, family history, adherence, ...). Personas
cycle through the 16 MBTI types and the income and education levels so that every combination of
traits the simulator reacts to occurs.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from clinicloop.verifier.patients import (
    SCRIPTS_PATH,
    Fact,
    HiddenFinding,
    MedicalRecord,
    Outcome,
    PatientScript,
    Persona,
)

# Per kind: (doctor words that count as asking, patient words that disclose it); a case adds the
# words specific to its own finding.
HIDDEN_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "smoking": (("smok", "tobacco", "cigarette", "vape", "vaping"),
                ("smok", "cigarette", "tobacco", "vape", "vaping")),
    "alcohol": (("alcohol", "drink", "beer", "wine", "spirits"),
                ("alcohol", "drink", "beer", "wine", "vodka", "whisky", "gin")),
    "family": (("family", "relative", "parent", "father", "mother", "brother", "sister",
                "runs in", "inherit"),
               ("father", "mother", "brother", "sister", "family", "grandmother", "grandfather")),
    "travel": (("travel", "trip", "abroad", "overseas", "been away", "flight", "flew", "holiday"),
               ("travel", "trip", "flew", "flight", "abroad", "overseas", "holiday")),
    "sexual": (("sexual", "sex", "partner", "intercourse", "condom", "protection"),
               ("partner", "sex", "unprotected", "condom")),
    "pregnancy": (("pregnan", "period", "menstrua", "contracept"),
                  ("pregnan", "missed period", "last period", "period is")),
    "adherence": (("medication", "medicine", "tablet", "pill", "taking", "dose", "prescri",
                   "inhaler", "insulin"),
                  ("stopped taking", "stopped using", "ran out", "skipped", "forgot")),
    "otc": (("medication", "medicine", "tablet", "taking", "painkiller", "over the counter",
             "supplement", "remed", "anything for", "using"), ()),
    "drugs": (("drug", "substance", "recreational", "cannabis", "cocaine"),
              ("cannabis", "cocaine", "marijuana", "weed")),
    "occupation": (("work", "job", "occupation", "exposure", "exposed", "living"), ()),
    "weight": (("weight", "appetite", "eating"), ("weight", "kilo", "pounds", "appetite")),
    "mood": (("mood", "stress", "feeling down", "anxious", "anxiety", "depress", "coping",
              "worri"), ()),
    "self_harm": (("harm", "hurt yourself", "suicid", "end your life", "safe", "thoughts"),
                  ("not being here", "suicid", "kill myself", "end my life")),
    "injury": (("injur", "fall", "fell", "accident", "trauma", "knock", "bump", "hit"),
               ("fell", "accident", "knocked", "tripped", "slipped")),
    "contacts": (("anyone", "contact", "around you", "live with", "household", "sick", "ill",
                  "outbreak", "children"), ()),
    "food": (("eat", "food", "meal", "diet", "ate", "drink"), ()),
    "exercise": (("exercise", "sport", "run", "activity", "active", "training"), ()),
    "vaccination": (("vaccin", "jab", "immunis", "flu shot"), ("flu jab", "vaccin")),
    "immunity": (("immun", "cancer", "chemotherapy", "history", "illness", "condition"),
                 ("chemotherapy", "lymphoma", "cancer")),
}


class H(NamedTuple):
    kind: str
    statement: str
    reveals: tuple[str, ...] = ()
    asked_by: tuple[str, ...] = ()


class Case(NamedTuple):
    id: str
    specialty: str
    age: int
    sex: str
    complaint: str
    hpi: str
    past: str
    meds: tuple[str, ...]
    allergies: tuple[str, ...]
    facts: tuple[tuple[str, bool, str], ...]  # ("term|term", present, what the patient says)
    hidden: tuple[H, H]
    diagnosis: str
    dx_terms: tuple[str, ...]
    plan: str
    red_flag: bool


NO_FEVER = ("fever|temperature", False, "No, I haven't had a fever.")
NO_CHEST_PAIN = ("chest pain", False, "No, I don't have any chest pain.")

CASES: tuple[Case, ...] = (
    Case("cardio-acs", "cardiology", 58, "male",
         "I've had a heavy pressure in my chest for the past hour.",
         "The pressure came on while I was shovelling snow and spreads to my left arm. "
         "I feel sweaty and a bit sick.",
         "High blood pressure for ten years.", ("amlodipine 5 mg daily",), (),
         (("chest pressure|chest pain|pressure in my chest", True,
           "Yes, the pressure in my chest is still there."),
          ("sweat", True, "Yes, I'm sweating a lot."), NO_FEVER,
          ("cough", False, "No, I don't have a cough.")),
         (H("smoking", "I smoke about twenty cigarettes a day."),
          H("family", "My father had a heart attack at fifty-two.")),
         "acute coronary syndrome", ("heart attack", "coronary", "angina", "myocardial"),
         "Call emergency services now and chew aspirin while waiting.", True),
    Case("neuro-stroke", "neurology", 71, "female",
         "My right arm went weak and my speech has been slurred since this morning.",
         "I noticed it at breakfast about two hours ago. My face feels droopy on the right.",
         "Atrial fibrillation and type 2 diabetes.",
         ("metformin 1 g twice daily", "apixaban 5 mg twice daily"), (),
         (("weak", True, "Yes, my right arm is still weak."),
          ("slurred|speech", True, "Yes, my speech is still slurred."),
          ("headache", False, "No, I don't have a headache."), NO_FEVER),
         (H("adherence", "I stopped taking my apixaban last week because of bruising."),
          H("alcohol", "I drink a bottle of wine most evenings.")),
         "acute ischaemic stroke", ("stroke", "transient ischaemic", "tia"),
         "Call an ambulance now; this needs emergency stroke assessment.", True),
    Case("neuro-sah", "neurology", 44, "female",
         "I suddenly got the worst headache of my life an hour ago.",
         "It came on within seconds while I was lifting a box. "
         "My neck feels stiff and light hurts my eyes.",
         "I get occasional migraines.", (), ("codeine",),
         (("headache", True, "Yes, the headache is still severe."),
          ("stiff|neck", True, "Yes, my neck is stiff."), NO_FEVER,
          ("weak", False, "No, my arms and legs are not weak.")),
         (H("family", "My mother died of a brain aneurysm."),
          H("smoking", "I smoke ten cigarettes a day.")),
         "subarachnoid haemorrhage", ("subarachnoid", "haemorrhage", "hemorrhage", "bleed"),
         "Go to the emergency department now by ambulance for a CT scan.", True),
    Case("pulm-pe", "pulmonology", 34, "female",
         "I've been short of breath since yesterday and it hurts when I breathe in.",
         "The pain is sharp on the right side of my chest. "
         "My heart is racing and my left calf is swollen.",
         "Nothing significant.", ("combined contraceptive pill",), (),
         (("short of breath|breathless", True, "Yes, I'm short of breath even at rest."),
          ("calf|swollen", True, "Yes, my left calf is swollen and sore."), NO_FEVER,
          ("cough", False, "No, I don't have a cough.")),
         (H("travel", "I flew back from Australia four days ago."),
          H("smoking", "I smoke a few cigarettes at weekends.")),
         "pulmonary embolism", ("pulmonary embolism", "embolism", "blood clot", "clot"),
         "Go to the emergency department now for a scan of the lungs.", True),
    Case("gyn-ectopic", "gynecology", 29, "female",
         "I have bad pain low on my left side and some spotting.",
         "The pain started this morning and keeps getting worse. I felt faint when I stood up.",
         "Chlamydia treated three years ago.", (), ("penicillin",),
         (("pain", True, "Yes, the pain is still there and getting worse."),
          ("spotting|bleeding", True, "Yes, there is a little bleeding."), NO_FEVER,
          ("faint|dizzy", True, "Yes, I feel faint when I stand.")),
         (H("pregnancy", "My last period was seven weeks ago."),
          H("sexual", "I had unprotected sex with a new partner.")),
         "ectopic pregnancy", ("ectopic",),
         "Go to the emergency department now; you need an urgent scan.", True),
    Case("infect-meningitis", "infectious disease", 19, "male",
         "I've got a high fever, a bad headache and I keep vomiting.",
         "It started last night. Bright light hurts my eyes and there is a rash on my legs "
         "that stays when I press a glass on it.",
         "Eczema as a child.", (), (),
         (("fever|temperature", True, "Yes, my temperature was 39.8 this morning."),
          ("rash", True, "Yes, the rash on my legs is spreading."),
          ("vomit", True, "Yes, I have vomited four times."),
          ("cough", False, "No, I don't have a cough.")),
         (H("contacts", "Two people in my dorm were taken to hospital this week.",
            ("dorm", "roommate")),
          H("alcohol", "I was drinking heavily at a party on Friday.")),
         "bacterial meningitis", ("meningitis", "meningococcal", "sepsis", "septicaemia"),
         "Call an ambulance now; you need antibiotics in hospital immediately.", True),
    Case("gi-bleed", "gastroenterology", 63, "male",
         "I've been vomiting blood this afternoon.",
         "I brought up about a cup of bright red blood twice. "
         "My stools have been black since yesterday and I feel dizzy.",
         "Chronic back ache.", (), (),
         (("vomit", True, "Yes, I vomited blood twice."),
          ("black|stool", True, "Yes, my stools are black."),
          ("dizzy|faint", True, "Yes, I feel dizzy when I stand."), NO_CHEST_PAIN),
         (H("otc", "I've been taking ibuprofen several times a day for my back.",
            ("ibuprofen", "naproxen", "painkiller")),
          H("alcohol", "I drink about six beers every night.")),
         "upper gastrointestinal bleed", ("bleed", "ulcer", "haemorrhage", "gastrointestinal"),
         "Go to the emergency department now; you need an urgent endoscopy.", True),
    Case("endo-dka", "endocrinology", 22, "male",
         "I've been very thirsty, peeing all the time and now I'm vomiting.",
         "It has been getting worse for three days. "
         "My breathing feels deep and fast, and I feel drowsy.",
         "Type 1 diabetes since childhood.",
         ("insulin glargine 20 units at night", "insulin aspart with meals"), (),
         (("thirst", True, "Yes, I'm extremely thirsty."),
          ("vomit", True, "Yes, I've vomited three times today."),
          ("drowsy|sleepy", True, "Yes, I feel very drowsy."), NO_CHEST_PAIN),
         (H("adherence", "I ran out of insulin four days ago."),
          H("weight", "I've lost about four kilos this month.")),
         "diabetic ketoacidosis", ("ketoacidosis", "dka", "ketones"),
         "Go to the emergency department now; you need fluids and insulin in hospital.", True),
    Case("uro-torsion", "urology", 15, "male",
         "I woke up with a really painful left testicle.",
         "The pain began suddenly about three hours ago and I've been sick twice. "
         "The testicle looks higher than the other one.",
         "Asthma as a child.", (), (),
         (("pain", True, "Yes, it is still very painful."),
          ("vomit|sick", True, "Yes, I was sick twice."), NO_FEVER,
          ("burn|sting", False, "No, it doesn't burn when I pee.")),
         (H("injury", "I got kicked there playing football yesterday.", ("kicked", "football")),
          H("episodes", "This happened last month too and went away after an hour.",
            ("last month",), ("before", "previous", "episode", "again", "happened"))),
         "testicular torsion", ("torsion", "twisted"),
         "Go to the emergency department now; you may need urgent surgery.", True),
    Case("allergy-anaphylaxis", "allergy", 27, "female",
         "My lips and tongue are swelling and my throat feels tight.",
         "It started twenty minutes ago, after lunch at a new restaurant. "
         "I have hives all over my arms.",
         "Hay fever in spring.", (), ("peanuts",),
         (("swell", True, "Yes, my lips are still swelling."),
          ("hives|itch", True, "Yes, I have itchy hives on my arms."),
          ("wheez", True, "Yes, I'm a bit wheezy.")),
         (H("autoinjector", "I left my adrenaline pen at home.", ("adrenaline pen", "epipen"),
            ("pen", "adrenaline", "epinephrine", "epipen", "injector")),
          H("food", "The sauce might have had satay in it.", ("satay",))),
         "anaphylaxis", ("anaphyla", "allergic reaction"),
         "Use adrenaline and call an ambulance now.", True),
    Case("ortho-cauda-equina", "orthopedics", 48, "male",
         "My back pain got much worse and now my legs feel numb.",
         "Since yesterday the skin around my bottom feels numb "
         "and I've had trouble passing urine.",
         "Two slipped discs in the past.", (), (),
         (("numb", True, "Yes, both legs and my bottom feel numb."),
          ("back pain", True, "Yes, my back pain is severe."), NO_FEVER,
          ("urine|pee", True, "Yes, I have trouble passing urine.")),
         (H("occupation", "I lift heavy boxes all day in a warehouse.",
            ("warehouse", "heavy boxes")),
          H("otc", "I've been taking codeine a friend gave me.", ("codeine",))),
         "cauda equina syndrome", ("cauda equina", "spinal cord", "nerve compression"),
         "Go to the emergency department now for an urgent MRI scan.", True),
    Case("gi-reflux", "gastroenterology", 41, "male",
         "I get a burning feeling behind my breastbone after meals.",
         "It has been going on for two months and is worse when I lie down at night. "
         "Sometimes a sour taste comes up into my mouth.",
         "Nothing significant.", (), (),
         (("burning|heartburn", True, "Yes, the burning comes after most meals."),
          ("swallow", False, "No, I have no trouble swallowing."),
          ("vomit", False, "No, I haven't vomited."),
          ("blood", False, "No, I haven't seen any blood.")),
         (H("alcohol", "I drink three or four glasses of wine most nights."),
          H("food", "I eat a big takeaway late every night.", ("takeaway",))),
         "gastro-oesophageal reflux disease", ("reflux", "gerd", "gord", "acid"),
         "Try omeprazole 20 mg daily for four weeks, smaller evening meals and less alcohol.",
         False),
    Case("uro-uti", "urology", 32, "female",
         "It burns when I pee and I need to go all the time.",
         "It started three days ago. My urine is cloudy and smells strong.",
         "Nothing significant.", (), (),
         (("burn|sting", True, "Yes, it burns every time I pee."), NO_FEVER,
          ("back|loin|flank", False, "No pain in my back or sides."),
          ("blood", False, "No, there's no blood in my urine.")),
         (H("pregnancy", "My period is a week late."),
          H("sexual", "I have had a new partner since last month.")),
         "urinary tract infection", ("urinary tract infection", "uti", "cystitis", "bladder"),
         "A pregnancy test, then three days of nitrofurantoin and plenty of fluids.", False),
    Case("neuro-migraine", "neurology", 26, "female",
         "I keep getting throbbing headaches on one side of my head.",
         "They come about twice a month and last most of a day. "
         "I feel sick and have to lie in a dark room.",
         "Nothing significant.", ("combined contraceptive pill",), (),
         (("headache", True, "Yes, I get the headaches about twice a month."),
          ("zigzag|flashing|aura", True, "Yes, I see zigzag lines before they start."),
          ("weak|numb", False, "No, I don't get any weakness or numbness."), NO_FEVER),
         (H("otc", "I take paracetamol or ibuprofen on about fifteen days a month.",
            ("paracetamol", "ibuprofen", "painkiller")),
          H("family", "My mother has migraines too.")),
         "migraine with aura", ("migraine",),
         "Keep a headache diary, limit painkillers and stop the combined pill.", False),
    Case("endo-hypothyroid", "endocrinology", 52, "female",
         "I've been tired all the time and I always feel cold.",
         "For about six months my weight has gone up, my skin is dry and I'm constipated.",
         "Nothing significant.", (), (),
         (("tired|exhaust", True, "Yes, I'm exhausted every day."),
          ("cold", True, "Yes, I feel cold when others are warm."),
          ("palpitation", False, "No, I don't have palpitations."), NO_FEVER),
         (H("family", "My sister has an underactive thyroid."),
          H("mood", "I've been feeling tearful and flat.", ("tearful", "flat"))),
         "hypothyroidism", ("hypothyroid", "underactive thyroid", "thyroid"),
         "Blood tests for TSH and free T4, then levothyroxine if confirmed.", False),
    Case("endo-diabetes", "endocrinology", 49, "male",
         "I'm thirsty all the time and I get up at night to pee.",
         "It has been about three months. I'm also tired and my vision is a bit blurry.",
         "Nothing significant.", (), (),
         (("thirst", True, "Yes, I'm thirsty all day."),
          ("blurr|vision", True, "Yes, my vision is a bit blurry."),
          ("vomit", False, "No, I'm not vomiting."),
          ("numb|tingl", False, "No numbness or tingling in my feet.")),
         (H("family", "My father and my brother both have diabetes."),
          H("food", "I drink about two litres of cola a day.", ("cola", "soda"))),
         "type 2 diabetes", ("diabetes", "diabetic", "blood sugar"),
         "Check HbA1c, start lifestyle changes and metformin if confirmed.", False),
    Case("derm-eczema", "dermatology", 23, "female",
         "I have itchy, dry patches on the insides of my elbows.",
         "They flare up every winter and the skin cracks when I scratch. "
         "Moisturiser helps a little.",
         "Asthma as a child.", (), (),
         (("itch", True, "Yes, it's very itchy, especially at night."), NO_FEVER,
          ("weep|ooz|pus", False, "No, they don't weep or ooze."),
          ("dry", True, "Yes, the patches are dry and rough.")),
         (H("occupation", "I started working as a hairdresser in September.",
            ("hairdresser", "salon")),
          H("family", "My brother has asthma and eczema.")),
         "atopic eczema", ("eczema", "dermatitis"),
         "Use emollients generously, a mild steroid cream for flares and gloves at work.",
         False),
    Case("derm-shingles", "dermatology", 67, "male",
         "I have a painful band of blisters on the right side of my chest.",
         "Two days before the blisters appeared, the skin there burned and tingled. "
         "The rash stops at the middle of my back.",
         "Arthritis in both knees.", (), (),
         (("blister|rash", True, "Yes, the blisters are on the right side only."),
          ("pain|burn", True, "Yes, it burns a lot."),
          ("eye|vision", False, "No, my eyes are fine."), NO_FEVER),
         (H("contacts", "My baby grandson is staying with me.", ("grandson", "baby")),
          H("immunity", "I had chemotherapy for lymphoma last year.")),
         "shingles", ("shingles", "herpes zoster", "zoster"),
         "Start aciclovir now, with pain relief, and keep the rash covered.", False),
    Case("ent-sinusitis", "ENT", 38, "female",
         "My face hurts around my cheeks and my nose has been blocked for ten days.",
         "It started as a cold. Now I have thick green mucus "
         "and the pain is worse when I bend forward.",
         "Nothing significant.", (), (),
         (("blocked|congest", True, "Yes, my nose is still blocked."),
          ("pain|hurt|ache", True, "Yes, my cheeks ache."),
          ("swell", False, "No, there's no swelling around my eyes."),
          ("vision", False, "No, my vision is normal.")),
         (H("smoking", "I smoke about ten a day."),
          H("otc", "I've been using a decongestant nasal spray for two weeks.",
            ("nasal spray", "decongestant"))),
         "acute sinusitis", ("sinusitis", "sinus"),
         "Saline rinses, pain relief and stop the decongestant spray.", False),
    Case("ent-vertigo", "ENT", 61, "female",
         "The room spins when I turn over in bed.",
         "Each spell lasts less than a minute and it started a week ago. "
         "I feel sick during the spins.",
         "Nothing significant.", (), (),
         (("spin|dizz|vertigo", True, "Yes, the room spins for a few seconds."),
          ("hearing", False, "No change in my hearing."),
          ("headache", False, "No, I don't have a headache."),
          ("weak|numb", False, "No weakness or numbness.")),
         (H("injury", "I slipped and banged my head in the garden two weeks ago.",
            ("banged my head",)),
          H("alcohol", "I have two large gin and tonics every evening.")),
         "benign paroxysmal positional vertigo", ("positional vertigo", "bppv", "inner ear"),
         "An Epley manoeuvre, with a review if it persists.", False),
    Case("eye-conjunctivitis", "ophthalmology", 30, "male",
         "Both my eyes are red and sticky in the morning.",
         "It started in the left eye three days ago and moved to the right. "
         "My eyelids are glued shut when I wake up.",
         "Nothing significant.", (), (),
         (("sticky|discharge", True, "Yes, there's yellow sticky discharge."),
          ("pain|hurt", False, "No, they don't hurt, they feel gritty."),
          ("vision|blurr", False, "No, my vision is clear."), NO_FEVER),
         (H("contacts", "My daughter's nursery had an outbreak of pink eye.",
            ("nursery", "outbreak", "pink eye")),
          H("lenses", "I wear contact lenses and sometimes sleep in them.",
            ("contact lens", "lenses"), ("lens", "glasses"))),
         "bacterial conjunctivitis", ("conjunctivitis", "pink eye"),
         "Clean the eyes, leave the lenses out and use chloramphenicol drops.", False),
    Case("rheum-gout", "rheumatology", 55, "male",
         "My big toe is swollen, red and agonising.",
         "It woke me up last night. Even the bedsheet touching it hurts.",
         "High blood pressure.", ("bendroflumethiazide 2.5 mg daily",), (),
         (("swell|swollen", True, "Yes, my toe is very swollen."), NO_FEVER,
          ("other joint", False, "No other joints are affected.")),
         (H("alcohol", "I had a lot of beer at a wedding at the weekend."),
          H("food", "I eat red meat and seafood most days.", ("red meat", "seafood"))),
         "acute gout", ("gout", "uric acid"),
         "Naproxen or colchicine for the attack, rest and ice, uric acid checked later.", False),
    Case("ortho-knee", "orthopedics", 68, "female",
         "My right knee aches and gets stiff after I sit for a while.",
         "It has got worse over two years. It creaks and hurts more at the end of the day.",
         "Nothing significant.", (), (),
         (("stiff", True, "Yes, it is stiff in the mornings."),
          ("swollen|hot", False, "No, it isn't hot or very swollen."),
          ("lock|give way", False, "No, it doesn't lock or give way."), NO_FEVER),
         (H("weight", "I've put on twelve kilos since I retired."),
          H("otc", "I take my husband's tramadol when it's bad.", ("tramadol", "husband's"))),
         "knee osteoarthritis", ("osteoarthritis", "arthritis", "wear and tear"),
         "Exercise and physiotherapy, weight loss and paracetamol or a topical NSAID.", False),
    Case("ortho-heel", "orthopedics", 45, "female",
         "The bottom of my heel hurts badly with my first steps in the morning.",
         "It eases after a few minutes of walking but comes back after standing all day.",
         "Nothing significant.", (), (),
         (("heel", True, "Yes, the heel pain is worst in the morning."),
          ("numb|tingl", False, "No numbness or tingling."),
          ("swell", False, "No, there's no swelling."), NO_FEVER),
         (H("occupation", "I'm a nurse on twelve-hour shifts.", ("nurse", "shift")),
          H("exercise", "I started running five kilometres a day last month.",
            ("running", "jog"))),
         "plantar fasciitis", ("plantar fasci", "fasciitis"),
         "Stretching, supportive shoes, ice and simple pain relief.", False),
    Case("psych-depression", "psychiatry", 35, "male",
         "I've been feeling flat and I can't enjoy anything for a couple of months.",
         "I wake at four every morning and can't get back to sleep. Everything feels hard.",
         "Nothing significant.", (), (),
         (("tired", True, "Yes, I'm tired all the time."), NO_FEVER,
          ("voices", False, "No, I don't hear voices.")),
         (H("self_harm", "Sometimes I think about not being here."),
          H("alcohol", "I've been drinking half a bottle of vodka a night.")),
         "depression", ("depress", "low mood"),
         "Talking therapy, consider an antidepressant, a safety plan and review in two weeks.",
         False),
    Case("psych-panic", "psychiatry", 24, "female",
         "I keep getting attacks where my heart pounds and I can't breathe properly.",
         "They come out of nowhere a few times a week and last about ten minutes. "
         "I'm scared I'm dying during them.",
         "Nothing significant.", (), (),
         (("pound|racing|palpitation", True, "Yes, my heart pounds during the attacks."),
          NO_CHEST_PAIN, ("faint|passed out", False, "No, I have never fainted.")),
         (H("caffeine", "I drink four energy drinks a day for my exams.",
            ("energy drink", "coffee", "caffeine"), ("coffee", "caffeine", "energy drink")),
          H("drugs", "I use cannabis at weekends.")),
         "panic disorder", ("panic", "anxiety"),
         "Cognitive behavioural therapy, cut caffeine and learn breathing techniques.", False),
    Case("heme-iron", "hematology", 31, "female",
         "I get breathless on the stairs and I'm always exhausted.",
         "It has crept up over four months. People say I look pale.",
         "Nothing significant.", (), (),
         (("pale", True, "Yes, I look pale."),
          ("tired|exhaust", True, "Yes, I'm exhausted every day."), NO_CHEST_PAIN,
          ("black", False, "No black stools.")),
         (H("periods", "My periods are very heavy and last eight days.",
            ("periods", "flooding"), ("period", "menstrua", "bleeding")),
          H("food", "I stopped eating meat last year.", ("meat", "vegetarian", "vegan"))),
         "iron deficiency anaemia", ("anaemia", "anemia", "iron"),
         "A full blood count and ferritin, iron tablets and a review of the heavy periods.",
         False),
    Case("nephro-stone", "nephrology", 42, "male",
         "I have an awful pain in my right side that comes in waves.",
         "It started suddenly three hours ago and moves down towards my groin. "
         "I keep pacing around.",
         "Nothing significant.", (), (),
         (("pain", True, "Yes, the pain comes in waves."),
          ("pink|blood", True, "Yes, my urine looks pink."), NO_FEVER,
          ("diarrh", False, "No diarrhoea.")),
         (H("fluids", "I work outside in the heat and drink very little water.",
            ("drink very little", "heat"), ("drink", "fluid", "water")),
          H("family", "My father had kidney stones too.")),
         "kidney stone", ("kidney stone", "renal colic", "stone", "ureter"),
         "Pain relief with an NSAID, fluids and a scan; urgent review if a fever develops.",
         False),
    Case("pulm-asthma", "pulmonology", 19, "male",
         "My chest feels tight and I've been wheezing at night.",
         "It has been worse for two weeks since I caught a cold. "
         "My blue inhaler helps for a few hours.",
         "Asthma since childhood.",
         ("salbutamol inhaler as needed", "beclometasone inhaler twice daily"), (),
         (("wheez", True, "Yes, I wheeze most nights."),
          ("cough", True, "Yes, I cough at night."), NO_FEVER),
         (H("adherence", "I stopped using my brown preventer inhaler months ago."),
          H("smoking", "I vape most days.")),
         "asthma flare", ("asthma",),
         "Restart the preventer inhaler daily, check technique and stop vaping.", False),
    Case("cardio-hypertension", "cardiology", 57, "female",
         "A pharmacy machine said my blood pressure was 168 over 102.",
         "I've had a few morning headaches but otherwise feel well.",
         "Nothing significant.", (), (),
         (("headache", True, "Yes, I get headaches in the morning."), NO_CHEST_PAIN,
          ("short of breath|breathless", False, "No, I'm not short of breath."),
          ("vision|blurr", False, "No, my vision is fine.")),
         (H("otc", "I take ibuprofen most days for my shoulder.", ("ibuprofen",)),
          H("family", "My mother had a stroke at sixty.")),
         "hypertension", ("hypertension", "high blood pressure"),
         "Home blood pressure readings for a week, blood tests, less salt, then treatment.",
         False),
    Case("cardio-af", "cardiology", 72, "male",
         "My heartbeat feels irregular and fluttery.",
         "It started four days ago. I get tired walking to the shops.",
         "Nothing significant.", (), (),
         (("irregular|flutter", True, "Yes, it still feels irregular."), NO_CHEST_PAIN,
          ("faint|passed out", False, "No, I haven't fainted."),
          ("weak|numb", False, "No weakness or numbness.")),
         (H("alcohol", "I had a very heavy drinking weekend at my son's wedding."),
          H("otc", "I've been taking a decongestant for a cold.", ("decongestant",))),
         "atrial fibrillation", ("atrial fibrillation", "arrhythmia", "irregular heart"),
         "An ECG today, blood tests and a discussion of anticoagulation.", False),
    Case("infect-flu", "infectious disease", 36, "male",
         "I've had a fever, aching muscles and a dry cough for two days.",
         "It came on suddenly. I've been in bed and feel shivery.",
         "Nothing significant.", (), (),
         (("fever|temperature", True, "Yes, my temperature was 38.9 last night."),
          ("cough", True, "Yes, a dry cough."),
          ("short of breath|breathless", False, "No, I'm not short of breath."),
          ("rash", False, "No rash.")),
         (H("contacts", "Half my office has been off sick with flu this week.",
            ("office", "off sick", "colleague")),
          H("vaccination", "I skipped the flu jab this year.")),
         "influenza", ("influenza", "flu", "viral"),
         "Rest, fluids and paracetamol; come back if breathless or not better in a week.",
         False),
    Case("gi-ibs", "gastroenterology", 28, "female",
         "I get cramping tummy pain and bloating, with bouts of diarrhoea.",
         "It has come and gone for a year and eases after I open my bowels.",
         "Nothing significant.", (), (),
         (("bloat", True, "Yes, I bloat most afternoons."),
          ("blood", False, "No, I haven't seen any blood."),
          ("lost weight|weight loss", False, "No, I haven't lost weight."), NO_FEVER),
         (H("mood", "Work has been really stressful since a restructure.",
            ("stressful", "restructure")),
          H("food", "I chew sugar-free gum all day.", ("sugar-free", "gum"))),
         "irritable bowel syndrome", ("irritable bowel", "ibs"),
         "Regular meals, less sugar-free gum, soluble fibre and peppermint oil.", False),
    Case("uro-prostate", "urology", 66, "male",
         "I'm up four times a night to pee and the stream is weak.",
         "It has slowly got worse over a year. I feel I haven't emptied fully.",
         "Nothing significant.", (), (),
         (("stream", True, "Yes, the stream is weak."),
          ("blood", False, "No, there's no blood."),
          ("burn|sting", False, "No, it doesn't burn."), NO_FEVER),
         (H("otc", "I've been taking an antihistamine to help me sleep.", ("antihistamine",)),
          H("family", "My brother had prostate cancer at sixty-two.")),
         "benign prostatic hyperplasia", ("prostat", "bph"),
         "A urine test, a PSA after discussion, fewer evening drinks and possibly tamsulosin.",
         False),
)

_MBTI = ("ISTJ", "ENFP", "INTP", "ESFJ", "INFJ", "ESTP", "ISFP", "ENTJ",
         "ISTP", "ENFJ", "INTJ", "ESFP", "INFP", "ESTJ", "ISFJ", "ENTP")
_INCOME = ("low", "middle", "high")
_EDUCATION = ("primary", "secondary", "university")


def _hidden(h: H) -> HiddenFinding:
    asked_by, reveals = HIDDEN_KINDS.get(h.kind, ((), ()))
    return HiddenFinding(kind=h.kind, statement=h.statement,
                         asked_by=list(dict.fromkeys(asked_by + h.asked_by)),
                         reveals=list(dict.fromkeys(reveals + h.reveals)))


def _facts(case: Case) -> list[Fact]:
    facts = [Fact(terms=terms.split("|"), present=present, statement=statement)
             for terms, present, statement in case.facts]
    if case.allergies:
        facts += [Fact(terms=[a], present=True, statement=f"I'm allergic to {a}.")
                  for a in case.allergies]
    else:
        facts.append(Fact(terms=["allerg"], present=False, statement="I have no allergies."))
    return facts


def build(case: Case, index: int) -> PatientScript:
    # Different strides so that the three traits do not move in lockstep.
    persona = Persona(mbti=_MBTI[index % 16], income=_INCOME[index % 3],
                      education=_EDUCATION[(index // 3 + index) % 3])
    record = MedicalRecord(
        age=case.age, sex=case.sex, chief_complaint=case.complaint, present_illness=case.hpi,
        past_history=case.past, medications=list(case.meds), allergies=list(case.allergies),
        facts=_facts(case), hidden=[_hidden(h) for h in case.hidden])
    outcome = Outcome(diagnosis=case.diagnosis, diagnosis_terms=list(case.dx_terms),
                      plan=case.plan, red_flag=case.red_flag)
    return PatientScript(id=case.id, specialty=case.specialty, record=record, persona=persona,
                         outcome=outcome)


def generate() -> list[PatientScript]:
    return [build(case, i) for i, case in enumerate(CASES)]


def to_jsonl(scripts: list[PatientScript]) -> str:
    return "".join(s.model_dump_json() + "\n" for s in scripts)


def write_scripts(path: Path = SCRIPTS_PATH) -> int:
    """Regenerate the shipped scripts file; returns the number of scripts."""
    scripts = generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_jsonl(scripts), encoding="utf-8")
    return len(scripts)


if __name__ == "__main__":
    print(f"wrote {write_scripts()} patient scripts to {SCRIPTS_PATH}")
