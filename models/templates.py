"""Word lists and templates for the demo corpora (consumed by models/corpus.py).

Template mini-syntax: ``[a|b|c]`` picks one option (nesting allowed, empty options allowed) and
``{slot}`` is filled from the slot tables below; a slot keeps one value for a whole dialogue so
agent replies can refer back to what the customer said.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Shared word lists
# ---------------------------------------------------------------------------------------------

NAMES = (
    "Sam Maya Leo Nora Ivan Priya Omar Lucy Theo Ana Ben Chloe Daniel Emma Felix Grace Hugo Isla "
    "Jack Kate Liam Mia Noah Olive Paul Rosa Sofia Tom Vera Will Zoe Aiden Bella Carlos Dina Eli "
    "Fatima Gabe Hana Jonas Kira Marco Nina Oscar Ruby Sara Tariq Uma Victor Wendy Yusuf"
).split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
CITIES = (
    "Boston Denver Chicago Seattle Austin Miami Portland Atlanta Phoenix Dallas Toronto Madrid "
    "Lisbon Dublin London Paris Berlin Rome Oslo Vienna Tokyo Sydney Lima Cairo"
).split()
COLORS = "black white navy red green olive grey blue beige pink brown yellow".split()

# ---------------------------------------------------------------------------------------------
# General (everyday) corpus
# ---------------------------------------------------------------------------------------------

GENERAL_SLOTS: dict[str, list[str]] = {
    "place": (
        "park|library|market|beach|museum|bakery|station|school|office|garden|cafe|gym|river|"
        "old bridge|bookshop|cinema|hospital|post office|train station|farm"
    ).split("|"),
    "food": (
        "bread|apples|soup|pasta|rice|eggs|cheese|oranges|carrots|tea|coffee|cake|pancakes|"
        "noodles|tomatoes|beans|cookies|salad|pizza|fresh fish"
    ).split("|"),
    "weather": (
        "sunny|cold|windy|rainy|warm|cloudy|foggy|bright and clear|hot and humid|chilly|snowy"
    ).split("|"),
    "activity": (
        "read a book|go for a walk|bake bread|paint the fence|watch a movie|play chess|"
        "clean the kitchen|call a friend|plant some flowers|ride a bike|write a letter|"
        "learn a new song|fix the old radio|visit the museum|cook dinner|go swimming"
    ).split("|"),
    "animal": "dog cat bird horse rabbit fox duck goat owl turtle".split(),
    "family": "mother father sister brother aunt uncle cousin grandmother grandfather".split(),
    "object": (
        "umbrella|bag|lamp|map|key|notebook|blanket|bicycle|kettle|clock|guitar|camera|scarf|"
        "basket|jacket"
    ).split("|"),
    "feeling": "happy tired excited calm curious nervous proud surprised sleepy glad".split(),
    "time": "in the morning|at noon|in the afternoon|in the evening|at night|before lunch|"
    "after dinner|early today|late last night".split("|"),
    "subject": "math|history|music|art|science|French|biology|cooking|poetry|geography".split("|"),
    "hobby": "gardening|running|painting|chess|knitting|photography|hiking|baking|fishing|"
    "singing".split("|"),
    "street": "Oak Pine Maple Hill Lake Park Mill River Elm Cedar Bay Station".split(),
    "floor": "first second third fourth fifth".split(),
}

GENERAL_SENTENCES = [
    "{name} walked to the {place} {time} to buy some {food}.",
    "The weather was {weather}, so {name} decided to [stay home and |]{activity}.",
    "My {family} [likes|loves|enjoys] {hobby} and does it [every weekend|most days|when it is "
    "{weather}].",
    "On {day}, {name} and {name2} [met|had lunch|talked for hours] at the {place}.",
    "[There is|I saw] a small {animal} near the {place}[ this morning|].",
    "{name} [forgot|lost|found] [a|the] {object} at the {place}.",
    "It was {weather} [all day|in {city}|this week], and everyone felt {feeling}.",
    "After school, {name} [studied|practiced] {subject} [for an hour|with a friend|at the "
    "library].",
    "We [want|plan|hope] to {activity} [this weekend|on {day}|next week].",
    "The {place} [opens at [eight|nine|ten] in the morning|closes at [five|six|seven] in the "
    "evening].",
    "[Yesterday|Last {day}|This morning], I [made|cooked|ate] {food} with my {family}.",
    "{name} felt {feeling} because the {object} [was finally fixed|worked again|was a gift].",
    "[Please|Don't forget to] bring [a|your] {object} [if you go to|when you visit] the {place}.",
    "The {animal} [slept|waited|sat] [under the table|by the door|in the sun] [all afternoon|"
    "for a while|quietly].",
    "{name} [moved|traveled|flew] to {city} in {month} [to start a new job|to visit family|"
    "for a holiday].",
    "[In|During] {month}, the [days are|nights are|streets are] {weather} in {city}.",
    "I think {hobby} is [fun|relaxing|hard at first|a good way to rest].",
    "{name} [bought|borrowed|needed] a new {object} [for the trip|for school|for work].",
    "[Every|Each] {day}, my {family} [goes to|walks to|visits] the {place}.",
    "The {food} at the {place} [was|tasted] [great|too salty|fresh|a little cold].",
    "It takes about [ten|twenty|thirty|forty] minutes to walk from the {place} to the {place2}.",
    "{name} [asked|told] {name2} [about|a story about] the {animal} [at the {place}|from {city}].",
    "We [should|could] {activity} [before it gets dark|after lunch|if it stays {weather}].",
    "The [book|film|song|game] was [long|short|funny|sad|exciting], but {name} [liked|loved] it.",
]

# Short chats between two named people.
GENERAL_DIALOGUES: list[list[str]] = [
    [
        "[What are you doing|Any plans] [this weekend|on {day}]?",
        "I [want|plan] to {activity}. [What about you?|And you?]",
        "[Maybe|Probably] I will {activity2}[ with my {family}|].",
    ],
    [
        "[How was|How did you like] the {place}?",
        "It was [nice|busy|quiet|lovely], [but|and] the weather was {weather}.",
    ],
    [
        "Do you want some {food}?",
        "[Yes, please.|No, thanks, I just ate.|Sure, just a little.]",
    ],
    [
        "[Have you seen|Where is] my {object}?",
        "[I think it is|It might be|I left it] [in the kitchen|by the door|at the {place}|in your "
        "bag].",
        "[Thanks|Oh, good|Great], I will look there.",
    ],
    [
        "Is it {weather} outside?",
        "[Yes|A little|Not really], [take|bring] your [umbrella|jacket|scarf] [just in case|"
        "anyway].",
    ],
    [
        "[When|What time] does the {place} open?",
        "[It opens|I think it opens] at [eight|nine|ten] [in the morning|on weekdays].",
        "[Great|Okay|Perfect], let's go [then|together].",
    ],
    [
        "I [started|tried] {hobby} [last week|this month|recently].",
        "[Really?|Nice!|That sounds fun.] [Do you like it?|Is it hard?|How is it going?]",
        "[I love it.|It is harder than I thought.|It is very relaxing.]",
    ],
    [
        "Did you [call|visit] your {family} [yesterday|on {day}]?",
        "[Yes|Not yet], [we talked about|I want to ask about] the trip to {city}.",
    ],
    # Chats that repeat a detail back: they teach the model to copy numbers and names.
    [
        "[What is|Can I get] your [phone number|new number]?",
        "It is {phone}.",
        "[Thanks|Okay], so that is {phone}. [I will call you later.|I will text you.]",
    ],
    [
        "Which room is the [meeting|class|party] in?",
        "It is in room {room}[ on the {floor} floor|].",
        "Room {room}, got it. See you there.",
    ],
    [
        "What is the code for the [door|gate|locker]?",
        "The code is {pin}.",
        "{pin}. Thanks, I will [remember it|write it down].",
    ],
    [
        "What time does the [train|bus|movie|game] [leave|start]?",
        "It [leaves|starts] at {clock}.",
        "[Great|Okay], {clock} it is. [See you then.|I will be there.]",
    ],
    [
        "Do you know [who|anyone who] can fix my {object}?",
        "[Ask|Try] {name3}. {name3} [fixed mine last week|is good with that].",
        "Thanks, I will talk to {name3} [tomorrow|on {day}].",
    ],
    [
        "Where does {name3} live now?",
        "{name3} lives at {k}{k2} {street} Street in {city}.",
        "{k}{k2} {street} Street? I will send a card there.",
    ],
]

# Generic front-desk support chats so the base model learns the Customer/Agent format.
GENERAL_SUPPORT: list[list[str]] = [
    [
        "[Hi|Hello], what are your opening hours?",
        "We are open from [eight|nine] to [five|six] [on weekdays|every day]. [Is there anything "
        "else I can help with?|]",
    ],
    [
        "[Can I|How do I] talk to a [person|real person|human]?",
        "[You are talking to one now|I am here to help]. What do you need?",
    ],
    [
        "I forgot the password [for my account|to log in].",
        "No problem. [Use the|Click the] [Forgot password|Reset password] link and we will email "
        "you a new one.",
    ],
    [
        "I [want|would like] to leave some feedback.",
        "[Thank you|Thanks], we read every message. [Please go ahead.|What would you like to "
        "share?]",
    ],
    [
        "[Is your office|Are you] open on {day}?",
        "[Yes, we are open on {day} from nine to five.|No, we are closed on {day}. Sorry about "
        "that.]",
    ],
    [
        "[How can I|Can I] contact you by email?",
        "You can [write to|email] our [help desk|support team] at any time and we reply within "
        "[one business day|two days].",
    ],
    [
        "My [ticket|case|reference] number is {ref}. [Any update?|Can you check it?]",
        "Thanks. [Ticket|Case] {ref} is [being reviewed|with our team|solved], and we will email "
        "you [today|within {n} days].",
    ],
    [
        "I [booked|have] a table for {k} at {clock}[ under the name {name}|].",
        "[Yes|Thanks], I see a table for {k} at {clock}. [See you soon!|We look forward to "
        "seeing you.]",
    ],
    [
        "Can I [move|change] my appointment [on|from] {day} to {day2}?",
        "Sure, I have moved your appointment from {day} to {day2} at {clock}.",
    ],
]

# ---------------------------------------------------------------------------------------------
# Tenant domains. An intent is a list of turns: the first is always used, later ones are
# follow-ups included with some probability. A turn is a list of alternatives, each a pair
# (customer templates, agent templates) in which every agent reply answers every customer line.
# ---------------------------------------------------------------------------------------------

Pair = tuple[list[str], list[str]]
Turn = list[Pair]

TENANTS: dict[str, dict] = {}

TENANTS["retailer"] = {
    "brand": "Maple Lane",
    "system": [
        "You are a [friendly|helpful] support agent for Maple Lane, an online clothing and home "
        "store.",
        "You help Maple Lane customers with orders, shipping, returns and sizes.",
    ],
    "slots": {
        "item": (
            "sweater|jacket|dress|pair of jeans|t-shirt|hoodie|pair of boots|pair of sneakers|"
            "wool coat|linen shirt|rain jacket|backpack|scarf|throw blanket|table lamp|desk chair|"
            "bath towel set|coffee mug set"
        ).split("|"),
        "size": "XS S M L XL XXL".split(),
        "carrier": "QuickShip|Parcel Express|Northway Post|Speedy Courier".split("|"),
        "code": "SAVE10 WELCOME15 SPRING20 FREESHIP MAPLE25 HOLIDAY30".split(),
        "store": ["our {city} store", "the {city} store"],
        "material": "cotton|wool|linen|recycled polyester|organic cotton|denim|leather".split("|"),
    },
    "chains": [
        [
            [
                (
                    [
                        "Where is my order?",
                        "My order [hasn't arrived|is late].",
                        "I [want|would like] to check on my order.",
                    ],
                    [
                        "[Sure|I can check that]. What is your order number?",
                        "Happy to help. Could you share your order number?",
                    ],
                )
            ],
            [
                (
                    ["It is {order}.", "{order}", "The order number is {order}."],
                    [
                        "Thanks. Order {order} shipped on {day} with {carrier} and should arrive "
                        "within {n} business days.",
                        "Thank you. Order {order} is [packed|being packed] and will ship "
                        "[today|tomorrow].",
                    ],
                )
            ],
        ],
    ],
    "intents": [
        [
            [
                (
                    [
                        "Where is my order {order}?",
                        "[Hi, |Hello, |]I [ordered|bought] a {color} {item} [last week|on {day}] "
                        "and it [hasn't arrived|still isn't here]. Order {order}.",
                        "Can you [check|tell me] the status of order {order}?",
                        "[My|The] order {order} [still shows no updates|hasn't moved] [in days|"
                        "since {day}].",
                        "When will order {order} [arrive|be delivered]?",
                    ],
                    [
                        "Your order {order} shipped on {day} with {carrier} and [will arrive|"
                        "should arrive] within {n} business days.",
                        "I checked order {order}. It is [on its way|in transit] with {carrier}, "
                        "tracking number {tracking}. [Expected delivery is {day2}.|It should "
                        "arrive by {day2}.]",
                        "Order {order} is [packed|being packed] at our warehouse and will ship "
                        "[today|tomorrow]. You will get a tracking email [soon|once it leaves].",
                        "[Thanks for waiting.|Thanks for your patience.] Order {order} was "
                        "delayed at the [warehouse|carrier hub], but it is moving again and "
                        "should arrive by {day2}.",
                    ],
                )
            ],
            [
                (
                    [
                        "Can I get the tracking number?",
                        "[Which|What] carrier is it with?",
                        "Can you send [me |]the tracking link?",
                    ],
                    [
                        "Sure, the tracking number is {tracking} with {carrier}.",
                        "It is with {carrier}. [I just emailed you the tracking link.|You can "
                        "track it with number {tracking}.]",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "I [want|would like|need] to return [a|the] {item} I bought.",
                        "How do I return [an item|something]? The {item} [doesn't fit|is too "
                        "small|is too big|isn't what I expected].",
                        "[Can I|Is it possible to] return a {color} {item} from order {order}?",
                        "What is your return policy?",
                    ],
                    [
                        "You can return [any|most] items within {window} days of delivery. "
                        "[Go to|Open] Your Orders, choose the order and click Return item.",
                        "[Of course|Sure]. Returns are free within {window} days. I have "
                        "emailed you a prepaid return label.",
                        "[Yes|Sure], you can return it by mail or in {store}. The refund goes "
                        "back to your original payment method.",
                        "Our return window is {window} days. Items must be unworn with the tags "
                        "attached. [Would you like a return label?|I can start the return for "
                        "you.]",
                    ],
                )
            ],
            [
                (
                    ["How long does the refund take?", "When will I get my money back?"],
                    [
                        "Once we receive the item, the refund takes {n} to {m} business days to "
                        "show on your card.",
                        "We refund you as soon as the package reaches our warehouse, usually "
                        "within {n} days of drop off.",
                    ],
                ),
                (
                    ["Do I have to pay for return shipping?", "Is the return label free?"],
                    [
                        "No, return shipping is free with the label we sent.",
                        "Returns are free by mail and in {store}. Exchanges are free too.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "[Where is|What happened to] my refund for order {order}?",
                        "I returned the {item} [two weeks ago|last week|on {day}] but I have "
                        "not [been refunded|got my refund] yet.",
                        "[Has my refund been processed|Did my refund go through]? Order {order}.",
                    ],
                    [
                        "I see the return arrived on {day}. A refund of ${price} was issued and "
                        "[should appear|will show up] within {n} business days.",
                        "Your return is still on its way to our warehouse. As soon as it "
                        "arrives we will refund ${price} to your card.",
                        "The refund of ${price} was sent on {day}. Some banks take a few extra "
                        "days to post it.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "What size should I get in the {item}? I usually wear {size}.",
                        "Does the {color} {item} run [small|large|true to size]?",
                        "Is the {item} true to size? I am between {size} and {size2}.",
                    ],
                    [
                        "The {item} runs [slightly small|a little large|true to size], so [we "
                        "recommend|I would suggest] size {size2}.",
                        "It has a [relaxed|regular|slim] fit. If you are between sizes, [go "
                        "with|pick] the larger one.",
                        "Most customers [order|choose] their usual size in this {item}. The size "
                        "chart is on the product page under Size and fit.",
                    ],
                ),
                (
                    ["Do you have a size chart for the {item}?", "How do I find my size?"],
                    [
                        "[Yes|Sure], the size chart is [on the product page|below the photos] "
                        "under Size and fit.",
                        "Measure your chest and waist and compare them with the size chart on "
                        "the product page.",
                    ],
                ),
            ],
            [
                (
                    [
                        "[Can I|Could I] exchange it for a different size if it doesn't fit?",
                        "What if it is too [small|big]?",
                    ],
                    [
                        "[Yes|Of course], exchanges are free within {window} days. Just choose "
                        "Exchange in Your Orders and pick a new size.",
                        "No problem, you can exchange it for another size [at no cost|for free] "
                        "by mail or in {store}.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "When will the {color} {item} be back in stock?",
                        "The {item} in size {size} [says sold out|is out of stock]. Will you "
                        "restock it?",
                    ],
                    [
                        "The {color} {item} in size {size} is [expected back|restocking] around "
                        "{month} {date}. You can tap Notify me on the product page.",
                        "Sorry, that one is sold out and will not be restocked. It is still "
                        "available in {color2}.",
                    ],
                ),
                (
                    ["Do you have the {item} in {color}?", "Is the {color} {item} in stock?"],
                    [
                        "[Yes|Good news], we have {k} left in {color}. [I would order soon.|They "
                        "are selling quickly.]",
                        "Sorry, the {color} {item} is sold out. It is still available in {color2}.",
                    ],
                ),
                (
                    ["Is the {item} available in {store}?", "Can I pick up the {item} in store?"],
                    [
                        "We have the {item} in stock at {store} [today|right now]. Order online "
                        "and pick it up in about two hours.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "I [need|want] to cancel order {order}.",
                        "Can I cancel order {order}? I [ordered the wrong size|changed my mind].",
                        "[Please|Can you] cancel order {order}[, I placed it by mistake|]?",
                    ],
                    [
                        "I have cancelled order {order}. You will not be charged, and the "
                        "pending amount of ${price} will drop off your card in {n} days.",
                        "Order {order} has already shipped, so I cannot cancel it. Once it "
                        "arrives you can return it for free within {window} days.",
                        "[Done|All set]. Order {order} is cancelled and a confirmation email is "
                        "on its way.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "I [need|want] to change the [shipping|delivery] address for order "
                        "{order}.",
                        "I moved. Can you send order {order} to my new address in {city}?",
                    ],
                    [
                        "Order {order} has not shipped yet, so I can change it. Please send me "
                        "the new address.",
                        "Order {order} already left our warehouse. I can ask {carrier} to "
                        "redirect it, which can add {n} days.",
                        "[Sure|Of course]. I have updated the delivery address for order {order}.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "I received the wrong item. I ordered a {color} {item} but got a "
                        "{color2} one.",
                        "You sent me the wrong [color|size] for order {order}.",
                    ],
                    [
                        "I am sorry about that. I have sent the right {item} at no cost and "
                        "emailed you a free return label for the wrong one.",
                        "Sorry for the mix up. A replacement ships today, and you can keep or "
                        "donate the wrong one.",
                    ],
                ),
                (
                    [
                        "My {item} arrived [damaged|torn|broken|with a stain].",
                        "The {item} from order {order} is [damaged|broken].",
                    ],
                    [
                        "Sorry it arrived like that. Could you send a photo? I will send a new "
                        "{item} [right away|today] or refund ${price}, whichever you prefer.",
                        "I am sorry. I have refunded ${price} and you do not need to send the "
                        "{item} back.",
                    ],
                ),
                (
                    ["[Part of|Some of] my order {order} is missing."],
                    [
                        "Order {order} shipped in two boxes. The second box is with {carrier} "
                        "and should arrive by {day2}.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "How much is shipping?",
                        "[How long does|How long will] [delivery|shipping] to {city} take?",
                        "Do you offer [express|next day|free] shipping?",
                    ],
                    [
                        "Standard shipping is free on orders over ${small} and takes {n} to {m} "
                        "business days.",
                        "Express shipping [costs|is] ${small} and arrives in one to two business "
                        "days. Standard shipping takes {n} to {m} days.",
                        "Orders placed before 2 pm ship the same day, and standard delivery "
                        "usually takes {n} days.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "The [promo|discount] code {code} [isn't working|doesn't work].",
                        "Why can't I use {code} on my order?",
                    ],
                    [
                        "The code {code} [expired on|ended on] {month} {date}, but I can give "
                        "you [a one time|an] equal discount on your order.",
                        "{code} only works on full price items. Your cart has sale items, which "
                        "is why it did not apply.",
                    ],
                ),
                (
                    ["I forgot to [add|use] the code {code}. Can you apply it?"],
                    [
                        "[No problem.|Sure.] I have applied {code} to order {order} and refunded "
                        "the difference of ${small} to your card.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "What is the {item} made of?",
                        "How do I wash the {color} {item}?",
                        "Is the {item} machine washable?",
                    ],
                    [
                        "The {item} is made of {material}. [Wash it cold and hang it to dry.|We "
                        "recommend a gentle cold wash.]",
                        "It is {material}, so [machine wash it cold and lay it flat to dry|dry "
                        "clean is best to keep its shape].",
                    ],
                )
            ],
        ],
    ],
}

TENANTS["bank"] = {
    "brand": "Harbor Bank",
    "system": [
        "You are a [secure|careful|helpful] support agent for Harbor Bank.",
        "You help Harbor Bank customers with cards, transfers, balances and loans. Never ask for "
        "a full card number or PIN.",
    ],
    "slots": {
        "card": ["card", "debit card", "credit card", "Harbor Visa card", "travel card"],
        "account": ["checking account", "savings account", "joint account", "business account"],
        "merchant": (
            "Cafe Luna|City Fuel|Green Grocer|StreamMax|Metro Transit|TechWorld|Sunny Travel|"
            "Bolt Rides|Pizza Corner|Home Supply"
        ).split("|"),
        "loan": ["personal loan", "car loan", "home loan", "student loan"],
        "rate": "4.9 5.4 6.2 6.9 7.5 8.1 9.4".split(),
    },
    "chains": [
        [
            [
                (
                    ["I lost my card.", "My card was stolen.", "I think someone took my card."],
                    [
                        "I am sorry to hear that. Which card is it, and what are the last four "
                        "digits?",
                    ],
                )
            ],
            [
                (
                    [
                        "My {card}, ending in {last4}.",
                        "It is my {card}. The last four are {last4}.",
                    ],
                    [
                        "Thank you. I have frozen your {card} ending in {last4}, so no one can "
                        "use it.",
                    ],
                )
            ],
        ],
    ],
    "intents": [
        [
            [
                (
                    [
                        "I lost my {card}.",
                        "[My|I think my] {card} [was stolen|is missing] [today|last night|on "
                        "{day}].",
                        "[Help, |]I can't find my {card} [anywhere|since {day}].",
                        "How do I freeze my {card}? [I lost it.|I think I lost it.]",
                    ],
                    [
                        "I am sorry to hear that. I have frozen your {card} ending in {last4}, "
                        "so no one can use it.",
                        "I have blocked the {card} ending in {last4} right away. [Do you see "
                        "any payments you don't recognize?|Please check your recent "
                        "transactions.]",
                        "[Your card is now frozen.|Done, the card is frozen.] If you find it, "
                        "you can unfreeze it in the app.",
                    ],
                )
            ],
            [
                (
                    ["Can I get a new card?", "[Yes|Please], send me a new card."],
                    [
                        "Your new {card} is ordered and will arrive in {n} business days. You "
                        "can use the digital card in the app today.",
                    ],
                ),
                (
                    ["Will my automatic payments still work?"],
                    [
                        "Your new card has a new number, so please update payments like "
                        "{merchant}. We will move most of them for you.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "I forgot my PIN.",
                        "How do I [reset|change] my PIN [for the|on my] {card}?",
                        "My PIN is [blocked|locked] after too many tries.",
                    ],
                    [
                        "You can reset your PIN in the app under Cards, then Manage PIN. For "
                        "your safety, never share your PIN with anyone, including us.",
                        "I have unlocked your {card} ending in {last4}. [Choose|Set] a new PIN "
                        "at any Harbor Bank ATM or in the app.",
                        "We will mail a PIN reminder to your address on file. It [takes|usually "
                        "takes] {n} business days.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "What is my [balance|current balance]?",
                        "How much [money|cash] is in my {account}?",
                        "Can you tell me the balance of my {account}?",
                    ],
                    [
                        "Your {account} ending in {last4} has a balance of ${amount}. [There is "
                        "one pending payment of ${small}.|There are no pending payments.]",
                        "The available balance in your {account} is ${amount}. [It will update "
                        "after tonight's payments.|Your last deposit was on {day}.]",
                        "For your security, I have sent a one time code to your phone. After "
                        "you confirm it, I can share your balance.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "How do I [transfer|move] ${amount} to my {account}?",
                        "Can I move money [between my accounts|to my {account}]?",
                    ],
                    [
                        "Transfers between your Harbor Bank accounts are instant. Open the app, "
                        "tap Transfer and choose your {account}.",
                    ],
                ),
                (
                    [
                        "I [want|need] to send ${small} to {name}.",
                        "How do I pay someone at another bank?",
                    ],
                    [
                        "Tap Pay someone in the app and enter their account details. Transfers "
                        "to other banks take one to {n} business days.",
                    ],
                ),
                (
                    [
                        "[Why|How come] my transfer of ${amount} [has not arrived|is still "
                        "pending]?",
                    ],
                    [
                        "Your transfer of ${amount} was sent on {day} and is pending at the "
                        "other bank. It should arrive by {day2}.",
                    ],
                ),
            ],
            [
                (
                    ["Is there a [fee|limit] for transfers?"],
                    ["There is no fee for transfers, and the daily limit is ${limit}."],
                ),
                (
                    ["Can I cancel the transfer?"],
                    [
                        "The transfer is still pending, so I have cancelled it. The money will "
                        "be back in your account today.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "There is a charge [from|at] {merchant} that I didn't make.",
                        "I [see|found] a transaction of ${small} I don't recognize.",
                        "I think someone used my {card} [without permission|for fraud].",
                    ],
                    [
                        "Thank you for telling us. I have frozen your {card} ending in {last4} "
                        "and opened a fraud claim for the ${small} charge at {merchant}.",
                        "I see the ${small} payment to {merchant} on {day}. I have disputed it, "
                        "and you will get a temporary credit within {n} business days.",
                    ],
                ),
                (
                    [
                        "I got a fraud alert [text|message] about my {card}.",
                        "Why did I get a fraud alert about my {card}?",
                    ],
                    [
                        "We sent that alert because of an unusual payment at {merchant}. If it "
                        "was not you, reply NO and we will block the card right away.",
                    ],
                ),
            ],
            [
                (
                    ["Will I get my money back?", "What happens next?"],
                    [
                        "[Yes|In most cases, yes]. You are not responsible for fraud you report "
                        "quickly. Our team will review the claim within {m} days.",
                        "We will send you a new {card} and email you updates on the claim. You "
                        "do not need to do anything else for now.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "Why was my {card} declined?",
                        "My card [got|was] declined at {merchant}.",
                        "My {card} [is not working|doesn't work] [online|abroad|in {city}].",
                    ],
                    [
                        "The payment was declined because it [went over your daily limit|looked "
                        "unusual to our fraud checks]. I have cleared it, so please try again.",
                        "Your {card} ending in {last4} was blocked for security after a payment "
                        "in {city}. I have unblocked it.",
                        "[Your card is active|Your card works], but online payments are turned "
                        "off. You can turn them on in the app under Card settings.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "I [want|would like] to apply for a {loan}.",
                        "[Am I|Would I be] eligible for a {loan}?",
                    ],
                    [
                        "Based on your account history, you are pre approved for a {loan} of "
                        "up to ${limit} at {rate}% APR.",
                        "You can apply in the app in about ten minutes. [Would you like to "
                        "start an application?|I can check your offer now.]",
                    ],
                ),
                (
                    ["What is the interest rate [for|on] a {loan}?"],
                    [
                        "Our {loan} rates start at {rate}% APR, depending on your credit history.",
                    ],
                ),
                (
                    ["How much can I borrow [for|with] a {loan}?"],
                    [
                        "You can borrow up to ${limit} with a {loan}, paid back over {n} to {m} "
                        "years.",
                    ],
                ),
            ],
            [
                (
                    ["How long does approval take?"],
                    [
                        "Most {loan} decisions are made within {n} business days, and the money "
                        "arrives the day after you sign.",
                    ],
                ),
                (
                    ["Will [applying|checking my rate] affect my credit score?"],
                    [
                        "Checking your rate uses a soft search, so it will not affect your "
                        "credit score. A full application does a hard search.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "Can you [raise|increase] my credit limit?",
                        "I [need|want] a higher limit on my {card}.",
                    ],
                    [
                        "Your current limit is ${amount}. I can raise it to ${limit} right away.",
                        "I have sent a limit increase request. You will hear back within {n} "
                        "business days.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "[Why was I|How come I was] charged an overdraft fee?",
                        "Can you refund the ${small} fee on my {account}?",
                    ],
                    [
                        "The fee was charged on {day} because your {account} went below zero. "
                        "As a one time courtesy, I have refunded it.",
                        "I have refunded the ${small} fee. You can turn on low balance alerts "
                        "to avoid it next time.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "When does my [paycheck|salary|direct deposit] arrive?",
                        "My [paycheck|direct deposit] [is late|hasn't come in].",
                    ],
                    [
                        "Direct deposits usually arrive by 9 am on payday. I see a deposit of "
                        "${amount} scheduled for {day}.",
                        "We have not received the deposit from your employer yet. Deposits "
                        "post as soon as they arrive, usually by {day2}.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "I [moved|have a new address]. How do I update my address?",
                        "How do I change my address on file?",
                    ],
                    [
                        "You can update your address in the app under Profile. For security we "
                        "will send a code to your phone to confirm it.",
                    ],
                ),
                (
                    ["I need to change the phone number on my account."],
                    [
                        "I have sent a verification code to your email. Once you confirm it, "
                        "your new number will be saved.",
                    ],
                ),
            ],
        ],
    ],
}

TENANTS["airline"] = {
    "brand": "Skylark Air",
    "system": [
        "You are a [friendly|helpful] support agent for Skylark Air.",
        "You help Skylark Air passengers with flights, bookings, baggage, seats and check-in.",
    ],
    "slots": {
        "cls": ["economy", "premium economy", "business class"],
        "bag_kg": "20 23 25 30 32".split(),
    },
    "chains": [
        [
            [
                (
                    ["Is my flight on time?", "Can you check my flight?"],
                    ["Sure. What is your flight number?", "Of course. Which flight are you on?"],
                )
            ],
            [
                (
                    ["It is {flight}.", "{flight} to {city}.", "Flight {flight}."],
                    [
                        "Flight {flight} is on time and departs at {clock} from gate {gate}.",
                        "Flight {flight} is delayed by about {k} hours. The new departure time "
                        "is {clock}.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    ["I [want|need] to change my booking.", "Can I change my flight?"],
                    ["Sure. What is your booking code?", "I can help. What is the booking code?"],
                )
            ],
            [
                (
                    ["It is {booking}.", "{booking}", "The code is {booking}."],
                    [
                        "Thanks. I can move booking {booking} to flight {flight} on {day} at "
                        "{clock}, with a fare difference of ${small}.",
                    ],
                )
            ],
        ],
    ],
    "intents": [
        [
            [
                (
                    [
                        "Is flight {flight} on time?",
                        "[What is the status of|Any news on] flight {flight} [to|from] {city}?",
                        "Is my flight to {city} [on time|delayed]?",
                    ],
                    [
                        "Flight {flight} to {city} is on time and departs at {clock} from gate "
                        "{gate}.",
                        "Flight {flight} is delayed by about {k} hours. The new departure time "
                        "is {clock}.",
                    ],
                ),
                (
                    [
                        "Why is my flight to {city} delayed?",
                        "[My|Our] flight {flight} [shows|says] delayed. What happened?",
                    ],
                    [
                        "Flight {flight} is delayed because of [weather in {city}|a late "
                        "arriving aircraft|a crew change]. The new departure time is {clock}.",
                        "[Sorry for the wait.|I am sorry about the delay.] Flight {flight} will "
                        "now leave at {clock}. Boarding starts 30 minutes before at gate {gate}.",
                    ],
                ),
            ],
            [
                (
                    ["Will I make my connection?", "What about my connecting flight?"],
                    [
                        "Your connection in {city2} has {n}0 minutes after landing, which should "
                        "be enough. If not, we will rebook you for free.",
                    ],
                ),
                (
                    ["Do I get [compensation|a meal voucher] for the delay?"],
                    [
                        "For delays over {n} hours you get a meal voucher in the app, and you "
                        "may be eligible for compensation after the trip.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "I [need|want] to change my flight to {city}.",
                        "Can I move booking {booking} to {day}?",
                        "[Can I|Is it possible to] fly [a day earlier|a day later] on booking "
                        "{booking}?",
                    ],
                    [
                        "I can move booking {booking}. There is a seat on flight {flight} on "
                        "{day} at {clock}, with a fare difference of ${small}.",
                        "Your {cls} fare allows free changes. I have moved you to flight "
                        "{flight} on {day}, departing at {clock}.",
                        "Changes to booking {booking} cost ${small} plus any fare difference. "
                        "[Would you like me to go ahead?|Should I book it?]",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "I [want|need] to cancel booking {booking}.",
                        "Can I get a refund for my flight to {city}?",
                        "[If I cancel, do I|Do I] get my money back?",
                    ],
                    [
                        "Booking {booking} has a flexible {cls} fare, so you can cancel for a "
                        "full refund of ${amount} within {n} business days.",
                        "Your ticket is non refundable, but I can cancel it and keep ${amount} "
                        "as travel credit valid for one year.",
                        "I have cancelled booking {booking}. [A refund|The refund] of ${amount} "
                        "will reach your card in {n} to {m} business days.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "How many bags can I [bring|check]?",
                        "What is the baggage allowance [for|in] {cls}?",
                    ],
                    [
                        "In {cls} you can check one bag up to {bag_kg} kg and bring one carry "
                        "on plus a small personal item.",
                        "Your {cls} ticket includes one checked bag up to {bag_kg} kg. Extra "
                        "bags are ${small} each if added online.",
                    ],
                ),
                (
                    [
                        "How much does an extra bag cost?",
                        "Is my bag too heavy at {bag_kg} kilos?",
                    ],
                    [
                        "An extra checked bag costs ${small} if you add it online, or more at "
                        "the airport.",
                        "Checked bags can weigh up to {bag_kg} kg in {cls}. Heavier bags cost "
                        "${small} each way.",
                    ],
                ),
            ],
            [
                (
                    ["What size can my carry on be?", "How big can my carry on bag be?"],
                    [
                        "Your carry on must fit in the overhead bin, about 55 by 40 by 23 cm, "
                        "and weigh under 10 kg.",
                    ],
                ),
                (
                    ["Can I bring a [stroller|guitar|car seat] on board?"],
                    [
                        "[Yes|Sure], it flies free. Please tell the gate agent and we will tag "
                        "it for you.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "My bag did not arrive in {city}.",
                        "[You lost|I can't find] my [bag|suitcase] [on|after] flight {flight}.",
                        "Where is my [luggage|bag]? [Booking {booking}.|I flew in on {day}.]",
                    ],
                    [
                        "I am sorry. Your bag is still in {city2} and will be on the next "
                        "flight. We will deliver it to your address by {day2}.",
                        "I have opened a report for your bag. Your file number is {booking}, "
                        "and you can track it in the app.",
                        "We found your bag. It arrives on flight {flight} at {clock} and our "
                        "courier will bring it to you.",
                    ],
                )
            ],
            [
                (
                    [
                        "Can I buy [a few things|toiletries|clothes] [while I wait|until it "
                        "arrives]?"
                    ],
                    [
                        "Yes, keep your receipts. We cover [reasonable|basic] items up to "
                        "${small} a day while your bag is delayed.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "Can I [choose|change] my seat on flight {flight}?",
                        "[I want|Is there] a [window|aisle] seat on booking {booking}?",
                    ],
                    [
                        "I have moved you to seat {seat}, [a window|an aisle] seat [near the "
                        "front|by the wing].",
                        "Seat {seat} is free on flight {flight}. Seat selection is included in "
                        "your {cls} fare.",
                    ],
                ),
                (
                    [
                        "How much is an upgrade to {cls}?",
                        "Can I upgrade to {cls} on flight {flight}?",
                    ],
                    [
                        "An upgrade to {cls} on flight {flight} is ${small}. [Would you like "
                        "it?|I can add it now.]",
                    ],
                ),
                (
                    ["Can my family sit together on flight {flight}?"],
                    [
                        "[Yes|Sure], I have seated your group together in row {row}, starting "
                        "at seat {row}A.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    ["When does check in open?", "How early can I check in online?"],
                    [
                        "Online check in opens 24 hours before departure and closes one hour "
                        "before. You can check in on our website or in the app.",
                    ],
                ),
                (
                    ["[Can you|Please] check me in for flight {flight}."],
                    [
                        "You are checked in for flight {flight}. Your boarding pass is in the "
                        "app, seat {seat}, boarding at {clock}.",
                    ],
                ),
                (
                    ["I can't check in [online|in the app] for booking {booking}."],
                    [
                        "Booking {booking} needs passport details before check in. Add them in "
                        "Manage booking and try again.",
                    ],
                ),
            ],
            [
                (
                    ["What time should I be at the airport?", "When does boarding close?"],
                    [
                        "Arrive at least two hours before departure. Boarding closes 20 minutes "
                        "before the flight leaves.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    [
                        "I missed my [flight|connection] in {city}.",
                        "My first flight was late and I missed flight {flight}.",
                    ],
                    [
                        "I am sorry. I have rebooked you on flight {flight} at {clock} at no "
                        "extra cost. Your new boarding pass is in the app.",
                        "Since the delay was on our side, I have booked you on the next flight "
                        "to {city2} and added a hotel voucher for tonight.",
                    ],
                )
            ],
        ],
        [
            [
                (
                    ["Can I bring my [dog|cat] on the flight?"],
                    [
                        "Small pets can fly in the cabin for ${small} if the carrier fits under "
                        "the seat. I have added it to booking {booking}.",
                    ],
                ),
                (
                    ["I need [wheelchair|special] assistance at the airport."],
                    [
                        "I have added assistance to booking {booking}. A team member will meet "
                        "you at check in.",
                    ],
                ),
                (
                    ["Can I order a [vegetarian|gluten free|child] meal?"],
                    [
                        "[Done|All set]. A special meal is booked for flight {flight}. Meals "
                        "must be ordered at least 24 hours before departure.",
                    ],
                ),
            ],
        ],
        [
            [
                (
                    [
                        "My miles [are missing|did not post] for flight {flight}.",
                        "I did not get miles for my trip to {city}.",
                    ],
                    [
                        "I see flight {flight} on {day}. I have credited {k}{k2}00 miles to your "
                        "Skylark Miles account.",
                    ],
                ),
                (
                    ["How do I add my frequent flyer number to booking {booking}?"],
                    [
                        "I have added your Skylark Miles number to booking {booking}. Miles "
                        "post within {n} days after the flight.",
                    ],
                ),
                (
                    ["How many miles do I have?"],
                    ["You have {miles} Skylark Miles, enough for a one way flight to {city}."],
                ),
            ],
        ],
    ],
}

# Small talk wrapped around tenant dialogues.
OPENER: Turn = [
    (
        [
            "Hi.",
            "Hello.",
            "Hi there.",
            "Hey, [I need some help.|can you help me?]",
            "Good [morning|afternoon|evening].",
        ],
        [
            "Hello! Welcome to {brand} support. How can I help you today?",
            "Hi, thanks for contacting {brand}. What can I do for you?",
            "[Good day|Hello]! [I am happy to help.|Sure, I can help.] What do you need?",
        ],
    )
]
CLOSER: Turn = [
    (
        [
            "Thanks!",
            "Thank you[ so much| very much|].",
            "Great, thanks[ for your help|].",
            "[Perfect|Okay|Got it], that's all.",
        ],
        [
            "You're welcome! Have a great day.",
            "[Happy to help|Glad I could help]. Thanks for choosing {brand}.",
            "Anytime. [Is there anything else I can help with?|Have a nice {day}.]",
        ],
    )
]
